"""Tokens compressed to weighted patterns for the expert-grouping search.

Given where each sample runs, a token's dedup sends depend only on its (sorted) top-k set and
its sample's rank, so identical (rank, top-k set) tokens are merged into one pattern with a
weight. On real routing this shrinks the work by orders of magnitude and makes the cost of an
expert swap independent of the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenPatterns:
    """Distinct (rank, expert set) tokens: experts_PK sorted per row, rank_P, weight_P."""

    experts_PK: np.ndarray
    rank_P: np.ndarray
    weight_P: np.ndarray


def build_patterns(topk_SLK: np.ndarray, sample_rank_S: np.ndarray, num_experts: int) -> TokenPatterns:
    """Merge the tokens of placed samples (rank >= 0) into weighted patterns."""
    placed = np.asarray(sample_rank_S) >= 0
    topk_SLK, rank_S = topk_SLK[placed], np.asarray(sample_rank_S, dtype=np.int64)[placed]
    k = topk_SLK.shape[2]
    experts_TK = np.sort(topk_SLK.reshape(-1, k).astype(np.int64), axis=1)
    rank_T = np.repeat(rank_S, topk_SLK.shape[1])
    num_ranks = int(rank_S.max()) + 1 if rank_S.size else 1
    if k * np.log2(max(num_experts, 2)) + np.log2(max(num_ranks, 2)) < 62:
        key_T = rank_T.copy()
        for column in range(k):
            key_T = key_T * num_experts + experts_TK[:, column]
        _, first, weight_P = np.unique(key_T, return_index=True, return_counts=True)
    else:
        rows_TC = np.concatenate([rank_T[:, None], experts_TK], axis=1)
        _, first, weight_P = np.unique(rows_TC, axis=0, return_index=True, return_counts=True)
    return TokenPatterns(experts_TK[first], rank_T[first], weight_P.astype(np.float64))
