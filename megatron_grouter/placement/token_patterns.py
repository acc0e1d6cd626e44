"""Tokens compressed to weighted patterns for the expert-grouping search.

Given where each sample runs, a token's dedup sends depend only on its (sorted) top-k set and
its sample's rank, so identical (rank, top-k set) tokens are merged into one pattern with a
weight. On real routing this shrinks the work by orders of magnitude and makes the cost of an
expert swap independent of the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import sparse


@dataclass(frozen=True)
class TokenPatterns:
    """Distinct (rank, expert set) tokens: experts_PK sorted per row, rank_P, weight_P."""

    experts_PK: np.ndarray
    rank_P: np.ndarray
    weight_P: np.ndarray
    num_experts: int

    def expert_incidence(self, values_PK: np.ndarray) -> sparse.csc_matrix:
        """Sparse [E, P] matrix with values_PK[p, j] at (experts_PK[p, j], p)."""
        num_patterns, k = self.experts_PK.shape
        return sparse.csc_matrix(
            (values_PK.ravel(), self.experts_PK.ravel(), np.arange(0, num_patterns * k + 1, k)),
            shape=(self.num_experts, num_patterns),
        )

    @cached_property
    def pair_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """Column pairs (i < j) of the K experts in a pattern."""
        return np.triu_indices(self.experts_PK.shape[1], 1)

    @cached_property
    def pair_ids(self) -> np.ndarray:
        """Id a·E + b of every expert pair (a < b) inside every pattern, [K(K-1)/2, P]."""
        first, second = self.pair_columns
        experts_KP = np.ascontiguousarray(self.experts_PK.T)
        return experts_KP[first] * self.num_experts + experts_KP[second]

    @cached_property
    def membership_PE(self) -> sparse.csr_matrix:
        """0/1 sparse [P, E]: which experts each pattern holds (built once per pattern set)."""
        return self.expert_incidence(np.ones(self.experts_PK.shape)).T.tocsr()


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
    return TokenPatterns(experts_TK[first], rank_T[first], weight_P.astype(np.float64), num_experts)
