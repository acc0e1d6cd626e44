"""An EP layout: where experts live and which rank processes each sample.

Experts are described by `expert_to_rank` [E]; samples by the global batches they belong to:
`batches_QB` [Q, B] holds the sample ids of each of Q global batches, and a placement
`placement_QNM` [Q, N, M] (M = B / N) lists the samples each rank gets in each batch. The default
layout is what Megatron does without a plan: contiguous experts (expert e on rank e // (E/N)) and
samples split in order (the b-th sample of a batch goes to rank b // M).
"""

from __future__ import annotations

import numpy as np

from megatron_grouter.errors import UserError
from megatron_grouter.placement.routing_input import check_partitioning


def contiguous_expert_to_rank(num_experts: int, num_ranks: int) -> np.ndarray:
    """Megatron's default: expert e lives on rank e // (E / N)."""
    per_rank = check_partitioning(num_experts, num_ranks)
    return np.arange(num_experts, dtype=np.int64) // per_rank


def sequential_batches(num_samples: int, global_batch: int) -> np.ndarray:
    """Global batches of consecutive sample ids [Q, B]; a trailing partial batch is dropped."""
    if global_batch < 1 or num_samples < global_batch:
        raise UserError(
            f"need at least one full global batch: {num_samples} samples, global batch {global_batch}"
        )
    num_batches = num_samples // global_batch
    return np.arange(num_batches * global_batch, dtype=np.int64).reshape(num_batches, global_batch)


def samples_per_rank(global_batch: int, num_ranks: int) -> int:
    """M = B / N, the equal share of every rank in every global batch."""
    if global_batch % num_ranks != 0:
        raise UserError(
            f"global batch {global_batch} is not divisible by {num_ranks} partitions; "
            "pick a global batch that is a multiple of the EP size"
        )
    return global_batch // num_ranks


def default_placement(batches_QB: np.ndarray, num_ranks: int) -> np.ndarray:
    """In-order split of each global batch: [Q, N, M] sample ids."""
    num_batches, global_batch = batches_QB.shape
    per_rank = samples_per_rank(global_batch, num_ranks)
    return batches_QB.reshape(num_batches, num_ranks, per_rank).copy()


def placement_to_sample_rank(placement_QNM: np.ndarray, num_samples: int) -> np.ndarray:
    """Rank of each sample [S]; -1 for samples in no batch. Raises if a sample appears twice."""
    num_batches, num_ranks, per_rank = placement_QNM.shape
    sample_rank_S = np.full(num_samples, -1, dtype=np.int64)
    ids = placement_QNM.reshape(-1)
    if np.unique(ids).size != ids.size:
        raise UserError("a sample is placed more than once; every sample must appear in exactly one slot")
    ranks = np.broadcast_to(np.arange(num_ranks)[None, :, None], placement_QNM.shape).reshape(-1)
    sample_rank_S[ids] = ranks
    return sample_rank_S
