"""How a sample's tokens hit the EP ranks under a given expert→rank map.

For the DeepEP-style dispatch a token is sent once to every remote rank that hosts at least one
of its top-k experts. For a sample s and a rank n let

    hit_SN[s, n]   = number of tokens of s with at least one expert on rank n
    distinct_S[s]  = Σ_t (number of distinct ranks token t touches)

If s is processed on rank n its deduplicated sends are distinct_S[s] - hit_SN[s, n], so both the
volumes and the sample placement only need these two arrays. They are computed without a loop
over ranks. Up to 64 ranks, each token becomes a bitmask of the ranks it touches (OR of its
experts' rank bits); popcount gives the distinct ranks and unpacking the bits counts hits per
rank. Beyond 64 ranks each token's K ranks are sorted and first occurrences are bincounted.
"""

from __future__ import annotations

import numpy as np


def rank_hits(
    topk_SLK: np.ndarray, expert_to_rank: np.ndarray, num_ranks: int, chunk_tokens: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Return (hit_SN int64 [S, N], distinct_S int64 [S]) for the given expert→rank map."""
    chunk_samples = max(1, chunk_tokens // max(1, topk_SLK.shape[1]))
    if num_ranks <= 64:
        return _rank_hits_bitmask(topk_SLK, np.asarray(expert_to_rank), num_ranks, chunk_samples)
    return _rank_hits_sorted(topk_SLK, np.asarray(expert_to_rank, dtype=np.int64), num_ranks, chunk_samples)


def _rank_hits_bitmask(
    topk_SLK: np.ndarray, expert_to_rank: np.ndarray, num_ranks: int, chunk_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    mask_dtype = next(np.dtype(f"<u{size}") for size in (1, 2, 4, 8) if num_ranks <= 8 * size)
    bit_E = np.left_shift(np.ones(expert_to_rank.size, dtype=mask_dtype), expert_to_rank.astype(mask_dtype))
    num_samples = topk_SLK.shape[0]
    hit_SN = np.zeros((num_samples, num_ranks), dtype=np.int64)
    distinct_S = np.zeros(num_samples, dtype=np.int64)
    for start in range(0, num_samples, chunk_samples):
        mask_SL = np.ascontiguousarray(np.bitwise_or.reduce(bit_E[topk_SLK[start : start + chunk_samples]], axis=2))
        distinct_S[start : start + mask_SL.shape[0]] = np.bitwise_count(mask_SL).sum(axis=1)
        bytes_SLB = mask_SL.view(np.uint8).reshape(mask_SL.shape[0], mask_SL.shape[1], -1)
        bits_SLR = np.unpackbits(bytes_SLB, axis=2, bitorder="little")
        hit_SN[start : start + mask_SL.shape[0]] = bits_SLR.sum(axis=1, dtype=np.int64)[:, :num_ranks]
    return hit_SN, distinct_S


def _rank_hits_sorted(
    topk_SLK: np.ndarray, expert_to_rank: np.ndarray, num_ranks: int, chunk_samples: int
) -> tuple[np.ndarray, np.ndarray]:
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
