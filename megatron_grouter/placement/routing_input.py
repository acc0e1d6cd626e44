"""Validation of the routing that the planner consumes.

The planner reads the routing cache as an integer array `topk_SLK`: for each of S training
samples of L tokens, the K distinct expert ids that the frozen Grouter picked for every token.
Everything downstream assumes ids in [0, E) and no repeated expert inside one token's top-k,
so both are checked once, here, with a one-line fix in the error.
"""

from __future__ import annotations

import numpy as np

from megatron_grouter.errors import UserError


def check_topk(topk_SLK: np.ndarray, num_experts: int) -> np.ndarray:
    """Return `topk_SLK` as an integer array after checking shape, range and distinctness."""
    topk_SLK = np.asarray(topk_SLK)
    if topk_SLK.ndim != 3:
        raise UserError(
            f"routing top-k must have shape [samples, tokens, k], got {topk_SLK.shape}; "
            "reshape the routing cache per training sample"
        )
    if not np.issubdtype(topk_SLK.dtype, np.integer):
        raise UserError(f"routing top-k must hold integer expert ids, got dtype {topk_SLK.dtype}")
    if topk_SLK.size == 0:
        raise UserError("routing top-k is empty; give at least one sample with one token")
    low, high = int(topk_SLK.min()), int(topk_SLK.max())
    if low < 0 or high >= num_experts:
        raise UserError(
            f"expert ids must lie in [0, {num_experts}), found [{low}, {high}]; "
            "check num_experts against the routing cache"
        )
    k = topk_SLK.shape[2]
    if k > 1:
        sorted_SLK = np.sort(topk_SLK, axis=2)
        if np.any(sorted_SLK[..., 1:] == sorted_SLK[..., :-1]):
            raise UserError("a token lists the same expert twice in its top-k; rebuild the routing cache")
    return topk_SLK


def check_partitioning(num_experts: int, num_partitions: int) -> int:
    """Return experts per partition; experts must split evenly over the EP partitions."""
    if num_partitions < 1 or num_experts % num_partitions != 0:
        raise UserError(
            f"{num_experts} experts cannot be split evenly over {num_partitions} partitions; "
            "choose an EP size (or node count) that divides the number of experts"
        )
    return num_experts // num_partitions
