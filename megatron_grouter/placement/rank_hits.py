"""How a sample's tokens hit the EP ranks under a given expert→rank map.

For the DeepEP-style dispatch a token is sent once to every remote rank that hosts at least one
of its top-k experts. For a sample s and a rank n let

    hit_SN[s, n]   = number of tokens of s with at least one expert on rank n
    distinct_S[s]  = Σ_t (number of distinct ranks token t touches)

If s is processed on rank n its deduplicated sends are distinct_S[s] - hit_SN[s, n], so both the
volumes and the sample placement only need these two arrays. They are computed without a loop
over ranks: map experts to ranks, sort each token's K ranks, keep first occurrences, bincount.
"""

from __future__ import annotations

import numpy as np


def rank_hits(
    topk_SLK: np.ndarray, expert_to_rank: np.ndarray, num_ranks: int, chunk_samples: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Return (hit_SN int64 [S, N], distinct_S int64 [S]) for the given expert→rank map."""
    expert_to_rank = np.asarray(expert_to_rank, dtype=np.int64)
    num_samples = topk_SLK.shape[0]
    hit_SN = np.zeros((num_samples, num_ranks), dtype=np.int64)
    distinct_S = np.zeros(num_samples, dtype=np.int64)
    for start in range(0, num_samples, chunk_samples):
        ranks_SLK = np.sort(expert_to_rank[topk_SLK[start : start + chunk_samples]], axis=2)
        first_SLK = np.ones(ranks_SLK.shape, dtype=bool)
        first_SLK[..., 1:] = ranks_SLK[..., 1:] != ranks_SLK[..., :-1]
        chunk = ranks_SLK.shape[0]
        rows_SLK = np.broadcast_to(np.arange(chunk, dtype=np.int64)[:, None, None], ranks_SLK.shape)
        flat = (rows_SLK * num_ranks + ranks_SLK)[first_SLK]
        hit_SN[start : start + chunk] = np.bincount(flat, minlength=chunk * num_ranks).reshape(chunk, num_ranks)
        distinct_S[start : start + chunk] = first_SLK.sum(axis=(1, 2))
    return hit_SN, distinct_S


def local_pairs(counts_SE: np.ndarray, expert_to_rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """Token-expert pairs of each sample that land on each rank: int64 [S, N]."""
    onehot_EN = np.zeros((counts_SE.shape[1], num_ranks), dtype=np.int64)
    onehot_EN[np.arange(counts_SE.shape[1]), np.asarray(expert_to_rank, dtype=np.int64)] = 1
    return counts_SE @ onehot_EN
