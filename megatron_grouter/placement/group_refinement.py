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
    membership_PE = patterns.membership_PE
    join_EN = np.asarray(membership_PE.T @ (empty_PN * weight_P[:, None]))
    sole_remote_PK = (hits_PN[rows[:, None], group_PK] == 1) & (group_PK != rank_P[:, None])
    weighted_sole_PK = sole_remote_PK * weight_P[:, None]
    leave_E = np.bincount(experts_PK.ravel(), weights=weighted_sole_PK.ravel(), minlength=num_experts)
    move_EN = join_EN - leave_E[:, None]

    # tokens holding both a and b: Σ_p w_p (u_pa + u_pb), over the expert pairs of each pattern
    first, second = patterns.pair_columns
    weighted_sole_KP = np.ascontiguousarray(weighted_sole_PK.T)
    both_EE = np.zeros(num_experts * num_experts)
    for pair, (i, j) in enumerate(zip(first, second)):
        both_EE += np.bincount(patterns.pair_ids[pair], weights=weighted_sole_KP[i] + weighted_sole_KP[j],
                               minlength=num_experts * num_experts)
    both_EE = both_EE.reshape(num_experts, num_experts)
    both_EE = both_EE + both_EE.T

    to_other_EE = move_EN[:, expert_to_group]
    gains_EE = to_other_EE + to_other_EE.T + both_EE
    gains_EE[expert_to_group[:, None] == expert_to_group[None, :]] = np.inf
    return gains_EE


def _disjoint_improving_swaps(gains_EE: np.ndarray, tolerance: float) -> list[tuple[int, int]]:
    """Improving swaps in order of gain, greedily keeping those that share no expert."""
    first, second = np.triu_indices(gains_EE.shape[0], 1)
    gain = gains_EE[first, second]
    improving = np.flatnonzero(gain < -tolerance)
    used: set[int] = set()
    chosen = []
    for index in improving[np.argsort(gain[improving], kind="stable")]:
        a, b = int(first[index]), int(second[index])
        if a not in used and b not in used:
            chosen.append((a, b))
            used.update((a, b))
    return chosen


def refine_groups_by_swaps(
    patterns: TokenPatterns, expert_to_group: np.ndarray, num_groups: int, max_rounds: int = 10_000
) -> tuple[np.ndarray, int]:
    """Swap descent until no expert swap lowers the sends; returns (groups, swaps made).

    Each round scores all swaps, applies every improving swap that shares no expert with a better
    one, and keeps that batch only if it beats the single best swap (swaps interact through
    tokens that hold experts of several of them); otherwise it applies the single best swap.
    """
    groups = np.asarray(expert_to_group, dtype=np.int64).copy()
    tolerance = 1e-9 * max(1.0, float(patterns.weight_P.sum()))
    swaps = 0
    for _ in range(max_rounds):
        chosen = _disjoint_improving_swaps(swap_gains(patterns, groups, num_groups), tolerance)
        if not chosen:
            break
        single = _swapped(groups, chosen[:1])
        if len(chosen) > 1:
            batch = _swapped(groups, chosen)
            if dedup_sends(patterns, batch, num_groups) < dedup_sends(patterns, single, num_groups):
                groups, swaps = batch, swaps + len(chosen)
                continue
        groups, swaps = single, swaps + 1
    return groups, swaps


def _swapped(groups: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    result = groups.copy()
    for a, b in pairs:
        result[a], result[b] = groups[b], groups[a]
    return result
