"""Joint search over expert groups and sample placement (beyond the paper).

The paper fixes expert groups from sample clusters and then places samples. Here the two steps
alternate on the exact deduplicated-send objective, with the capacity constraint in place:
  (a) samples: with groups fixed, every global batch is placed exactly (equal shares per
      partition) maximising the tokens that touch the sample's own partition;
  (b) experts: with placement fixed, the best expert swap between groups is applied until no
      swap lowers the sends (scored exactly for all pairs at once, see group_refinement).
Both steps never increase the objective, so the loop stops at a joint local optimum. A few
perturbations (random swaps, then the same descent) escape shallow optima; the best is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_grouter.placement.group_refinement import refine_groups_by_swaps
from megatron_grouter.placement.layout import placement_to_sample_rank
from megatron_grouter.placement.rank_hits import rank_hits
from megatron_grouter.placement.sample_placement import place_batches
from megatron_grouter.placement.token_patterns import build_patterns


@dataclass(frozen=True)
class SearchResult:
    """Best grouping found, its sends on the search instance, and how the search went."""

    expert_to_group: np.ndarray
    sends: float
    rounds: int
    swaps: int


def placed_sends(
    topk_SLK: np.ndarray, batches_QB: np.ndarray, expert_to_group: np.ndarray, num_groups: int, method: str = "exact"
) -> tuple[float, np.ndarray]:
    """Dedup sends after capacity-constrained placement under the grouping; (sends, sample_rank_S)."""
    hit_SN, distinct_S = rank_hits(topk_SLK, expert_to_group, num_groups)
    placement_QNM = place_batches(hit_SN, batches_QB, method)
    sample_rank_S = placement_to_sample_rank(placement_QNM, topk_SLK.shape[0])
    placed = sample_rank_S >= 0
    sends = distinct_S[placed].sum() - hit_SN[np.flatnonzero(placed), sample_rank_S[placed]].sum()
    return float(sends), sample_rank_S


def alternate(
    topk_SLK: np.ndarray, batches_QB: np.ndarray, expert_to_group: np.ndarray, num_experts: int,
    num_groups: int, max_rounds: int = 20,
) -> SearchResult:
    """Alternate exact placement and exact swap descent until the sends stop falling."""
    groups = np.asarray(expert_to_group, dtype=np.int64).copy()
    best_sends, sample_rank_S = placed_sends(topk_SLK, batches_QB, groups, num_groups)
    best_groups, total_swaps, rounds = groups, 0, 0
    for rounds in range(1, max_rounds + 1):
        patterns = build_patterns(topk_SLK, sample_rank_S, num_experts)
        groups, swaps = refine_groups_by_swaps(patterns, best_groups, num_groups)
        total_swaps += swaps
        if swaps == 0:
            break
        sends, new_rank_S = placed_sends(topk_SLK, batches_QB, groups, num_groups)
        if sends >= best_sends:
            break
        best_sends, best_groups, sample_rank_S = sends, groups, new_rank_S
    return SearchResult(best_groups, best_sends, rounds, total_swaps)


def perturbed_search(
    topk_SLK: np.ndarray, batches_QB: np.ndarray, start_groups: np.ndarray, num_experts: int, num_groups: int,
    perturbations: int = 4, kick_swaps: int = 3, seed: int = 0,
) -> SearchResult:
    """Iterated local search: descend, kick the best grouping with random swaps, descend again."""
    rng = np.random.default_rng(seed)
    best = alternate(topk_SLK, batches_QB, start_groups, num_experts, num_groups)
    for _ in range(perturbations):
        kicked = best.expert_to_group.copy()
        for _ in range(kick_swaps):
            a = int(rng.integers(num_experts))
            others = np.flatnonzero(kicked != kicked[a])
            b = int(rng.choice(others))
            kicked[a], kicked[b] = kicked[b], kicked[a]
        candidate = alternate(topk_SLK, batches_QB, kicked, num_experts, num_groups)
        if candidate.sends < best.sends:
            best = SearchResult(candidate.expert_to_group, candidate.sends, best.rounds + candidate.rounds,
                                best.swaps + candidate.swaps)
    return best
