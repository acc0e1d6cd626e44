"""Reference points for judging a plan: a capacity-free relaxation and an exact tiny-instance optimum.

- `capacity_free_sends`: with the expert groups fixed, drop the equal-share constraint and put
  every sample on its best partition (paper Algorithm 1). A lower bound on the sends of any
  capacity-respecting placement under those groups.
- `exact_optimum`: enumerate every split of the experts into equal groups (labels do not matter,
  so each split is visited once) and place samples exactly; the true joint optimum of a tiny
  instance, to measure how far the local search stops from it.
"""

from __future__ import annotations

from itertools import combinations
from math import comb, factorial

import numpy as np

from megatron_grouter.errors import UserError
from megatron_grouter.placement.joint_search import placed_sends
from megatron_grouter.placement.rank_hits import rank_hits
from megatron_grouter.placement.routing_input import check_partitioning


def capacity_free_sends(topk_SLK: np.ndarray, expert_to_group: np.ndarray, num_groups: int) -> float:
    """Dedup sends when each sample sits on its best partition, ignoring equal shares."""
    hit_SN, distinct_S = rank_hits(topk_SLK, expert_to_group, num_groups)
    return float(distinct_S.sum() - hit_SN.max(axis=1).sum())


def count_equal_splits(num_experts: int, num_groups: int) -> int:
    """Number of ways to split E experts into N unlabeled groups of E/N."""
    per_group = check_partitioning(num_experts, num_groups)
    ways = 1
    for remaining in range(num_experts, 0, -per_group):
        ways *= comb(remaining, per_group)
    return ways // factorial(num_groups)


def _equal_splits(free: list[int], per_group: int, group: int, assignment: np.ndarray):
    if not free:
        yield assignment.copy()
        return
    anchor, rest = free[0], free[1:]
    # the smallest free expert always opens the next group, which removes label symmetry
    for chosen in combinations(rest, per_group - 1):
        members = (anchor, *chosen)
        assignment[list(members)] = group
        yield from _equal_splits([e for e in rest if e not in chosen], per_group, group + 1, assignment)


def exact_optimum(
    topk_SLK: np.ndarray, batches_QB: np.ndarray, num_experts: int, num_groups: int, max_splits: int = 20_000
) -> tuple[float, np.ndarray]:
    """(minimum dedup sends, a grouping reaching it) by enumerating all equal splits."""
    per_group = check_partitioning(num_experts, num_groups)
    splits = count_equal_splits(num_experts, num_groups)
    if splits > max_splits:
        raise UserError(f"{splits} expert splits are too many to enumerate; use at most {max_splits} (a smaller instance)")
    best_sends, best_groups = np.inf, None
    for groups in _equal_splits(list(range(num_experts)), per_group, 0, np.zeros(num_experts, dtype=np.int64)):
        sends, _ = placed_sends(topk_SLK, batches_QB, groups, num_groups)
        if sends < best_sends:
            best_sends, best_groups = sends, groups
    return best_sends, best_groups
