"""Expert-pair swaps that lower the exact deduplicated send count for a fixed sample placement.

For a token t on rank r_t let h[t, n] be how many of its experts live on rank n. Its dedup sends
are c_t = Σ_{n ≠ r_t} [h[t, n] > 0]. Moving expert e from group A to rank n changes c_t, for
every token holding e, by [h[t, n] = 0 and n ≠ r_t] - [h[t, A] = 1 and A ≠ r_t]. Summed over
tokens this is a matrix D[e, n] obtained with one sparse product (incidence_EP @ empty_PN). A swap
of a (group A) and b (group B) costs D[a, B] + D[b, A] plus a correction for tokens holding both
(for them nothing changes, but the two moves each counted -[sole remote expert on its rank]).
That correction is a pair count over the K(K-1)/2 expert pairs of each pattern. So every swap is
scored exactly at once, and the best one is applied until none improves.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from megatron_grouter.placement.token_patterns import TokenPatterns


def dedup_sends(patterns: TokenPatterns, expert_to_group: np.ndarray, num_groups: int) -> float:
    """Σ_t weight_t · (remote ranks touched by t) for the patterns under the grouping."""
    hits_PN = _hits(patterns, expert_to_group, num_groups)
    touched_PN = hits_PN > 0
    touched_PN[np.arange(hits_PN.shape[0]), patterns.rank_P] = False
    return float(patterns.weight_P @ touched_PN.sum(axis=1))


def _hits(patterns: TokenPatterns, expert_to_group: np.ndarray, num_groups: int) -> np.ndarray:
    num_patterns = patterns.rank_P.size
    group_PK = expert_to_group[patterns.experts_PK]
    rows_PK = np.arange(num_patterns)[:, None] * num_groups + group_PK
    return np.bincount(rows_PK.ravel(), minlength=num_patterns * num_groups).reshape(num_patterns, num_groups)


def swap_gains(patterns: TokenPatterns, expert_to_group: np.ndarray, num_groups: int) -> np.ndarray:
    """Change of dedup sends for swapping every expert pair [E, E]; +inf within a group."""
    experts_PK, rank_P, weight_P = patterns.experts_PK, patterns.rank_P, patterns.weight_P
    num_patterns, k = experts_PK.shape
    num_experts = expert_to_group.size
    rows = np.arange(num_patterns)
    hits_PN = _hits(patterns, expert_to_group, num_groups)
    group_PK = expert_to_group[experts_PK]

    empty_PN = (hits_PN == 0).astype(np.float64)
    empty_PN[rows, rank_P] = 0.0
    incidence_EP = sparse.csr_matrix(
        (np.repeat(weight_P, k), (experts_PK.ravel(), np.repeat(rows, k))), shape=(num_experts, num_patterns)
    )
    join_EN = np.asarray(incidence_EP @ empty_PN)
    sole_remote_PK = ((hits_PN[rows[:, None], group_PK] == 1) & (group_PK != rank_P[:, None])).astype(np.float64)
    leave_E = np.bincount(experts_PK.ravel(), weights=(sole_remote_PK * weight_P[:, None]).ravel(), minlength=num_experts)
    move_EN = join_EN - leave_E[:, None]

    first, second = np.triu_indices(k, 1)
    pair_weight = (sole_remote_PK[:, first] + sole_remote_PK[:, second]) * weight_P[:, None]
    pair_ids = experts_PK[:, first] * num_experts + experts_PK[:, second]
    both_EE = np.bincount(pair_ids.ravel(), weights=pair_weight.ravel(), minlength=num_experts * num_experts)
    both_EE = both_EE.reshape(num_experts, num_experts)
    both_EE = both_EE + both_EE.T

    to_other_EE = move_EN[:, expert_to_group]
    gains_EE = to_other_EE + to_other_EE.T + both_EE
    gains_EE[expert_to_group[:, None] == expert_to_group[None, :]] = np.inf
    return gains_EE


def refine_groups_by_swaps(
    patterns: TokenPatterns, expert_to_group: np.ndarray, num_groups: int, max_swaps: int = 100_000
) -> tuple[np.ndarray, int]:
    """Apply the best improving expert swap until none is left; returns (groups, swaps made)."""
    groups = np.asarray(expert_to_group, dtype=np.int64).copy()
    tolerance = 1e-9 * max(1.0, float(patterns.weight_P.sum()))
    for swaps in range(max_swaps):
        gains_EE = swap_gains(patterns, groups, num_groups)
        a, b = np.unravel_index(np.argmin(gains_EE), gains_EE.shape)
        if not gains_EE[a, b] < -tolerance:
            return groups, swaps
        groups[a], groups[b] = groups[b], groups[a]
    return groups, max_swaps
