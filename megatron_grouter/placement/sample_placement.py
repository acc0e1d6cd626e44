"""Capacity-constrained placement of the samples of each global batch on EP partitions.

Training needs equal micro-batches, so every partition gets exactly M = B / N samples of every
global batch. Given a score per (sample, partition), e.g. tokens kept local, each batch is a
transportation problem with N sinks of capacity M. `exact` solves it with the Hungarian
algorithm on the B x B matrix that repeats every partition column M times; `greedy` assigns
samples in decreasing order of regret (best minus second-best score) to their best partition
with room, which is faster for very large batches. The unconstrained optimum (each sample on its
best partition) bounds both from above.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from megatron_grouter.errors import UserError
from megatron_grouter.placement.layout import samples_per_rank

PLACEMENT_METHODS = ("exact", "greedy")


def _exact_batch(score_BN: np.ndarray, per_rank: int) -> np.ndarray:
    """Partition of each sample of one batch, maximising the summed score exactly."""
    cost_BB = -np.repeat(score_BN.astype(np.float64), per_rank, axis=1)
    rows, cols = linear_sum_assignment(cost_BB)
    rank_B = np.empty(score_BN.shape[0], dtype=np.int64)
    rank_B[rows] = cols // per_rank
    return rank_B


def _greedy_batch(score_BN: np.ndarray, per_rank: int) -> np.ndarray:
    """Regret-ordered greedy: the samples with the most to lose choose first."""
    num_samples, num_ranks = score_BN.shape
    top2_B2 = np.sort(score_BN, axis=1)[:, -2:] if num_ranks > 1 else np.repeat(score_BN, 2, axis=1)
    order = np.lexsort((np.arange(num_samples), -(top2_B2[:, 1] - top2_B2[:, 0])))
    preference_BN = np.argsort(-score_BN, axis=1, kind="stable")
    room_N = np.full(num_ranks, per_rank, dtype=np.int64)
    rank_B = np.empty(num_samples, dtype=np.int64)
    for b in order:
        for n in preference_BN[b]:
            if room_N[n] > 0:
                rank_B[b] = n
                room_N[n] -= 1
                break
    return rank_B


def place_batches(score_SN: np.ndarray, batches_QB: np.ndarray, method: str = "exact") -> np.ndarray:
    """Placement [Q, N, M]: the sample ids each partition gets in each global batch.

    Samples keep their order inside a batch within each partition, so the result is deterministic.
    """
    if method not in PLACEMENT_METHODS:
        raise UserError(f"unknown placement method {method!r}; use one of {PLACEMENT_METHODS}")
    num_ranks = score_SN.shape[1]
    num_batches, global_batch = batches_QB.shape
    per_rank = samples_per_rank(global_batch, num_ranks)
    solve = _exact_batch if method == "exact" else _greedy_batch
    placement_QNM = np.empty((num_batches, num_ranks, per_rank), dtype=np.int64)
    for q in range(num_batches):
        ids_B = batches_QB[q]
        rank_B = solve(score_SN[ids_B], per_rank)
        order = np.lexsort((np.arange(global_batch), rank_B))
        placement_QNM[q] = ids_B[order].reshape(num_ranks, per_rank)
    return placement_QNM


def best_partition(score_SN: np.ndarray) -> np.ndarray:
    """Capacity-free choice: each sample on its highest-scoring partition (Algorithm 1)."""
    return np.argmax(score_SN, axis=1).astype(np.int64)
