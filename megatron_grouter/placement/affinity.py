"""Routing affinity vectors of training samples (paper eq. 6).

φ(X)_e is the share of sample X's tokens whose top-k contains expert e. Because a token's top-k
holds K distinct experts, Σ_e φ(X)_e = K. A sample whose φ is close to uniform has no preferred
expert group, so it is dropped from clustering (paper Appendix J) and only fills capacity.
"""

from __future__ import annotations

import numpy as np

from megatron_grouter.errors import UserError
from megatron_grouter.placement.routing_input import check_topk


def expert_token_counts(topk_SLK: np.ndarray, num_experts: int, chunk_samples: int = 4096) -> np.ndarray:
    """Per sample, the number of tokens that route to each expert: int64 [S, E]."""
    topk_SLK = check_topk(topk_SLK, num_experts)
    num_samples = topk_SLK.shape[0]
    counts_SE = np.zeros((num_samples, num_experts), dtype=np.int64)
    for start in range(0, num_samples, chunk_samples):
        chunk_SLK = topk_SLK[start : start + chunk_samples].astype(np.int64)
        rows = np.arange(chunk_SLK.shape[0], dtype=np.int64)[:, None, None]
        flat_ids = (rows * num_experts + chunk_SLK).ravel()
        counts_SE[start : start + chunk_SLK.shape[0]] = np.bincount(
            flat_ids, minlength=chunk_SLK.shape[0] * num_experts
        ).reshape(-1, num_experts)
    return counts_SE


def affinity_vectors(topk_SLK: np.ndarray, num_experts: int) -> np.ndarray:
    """φ per sample: float32 [S, E], share of the sample's tokens routed to each expert."""
    counts_SE = expert_token_counts(topk_SLK, num_experts)
    return (counts_SE / topk_SLK.shape[1]).astype(np.float32)


def normalised_entropy(phi_SE: np.ndarray) -> np.ndarray:
    """Entropy of φ/Σφ divided by log(E): 1.0 for a uniform affinity, 0.0 for a single expert."""
    num_experts = phi_SE.shape[1]
    p_SE = phi_SE / np.maximum(phi_SE.sum(axis=1, keepdims=True), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms_SE = np.where(p_SE > 0, p_SE * np.log(p_SE), 0.0)
    return (-terms_SE.sum(axis=1) / np.log(num_experts)).astype(np.float64)


def informative_sample_mask(phi_SE: np.ndarray, entropy_threshold: float) -> np.ndarray:
    """True for samples whose normalised entropy is at most the threshold (kept for clustering)."""
    if not 0.0 < entropy_threshold <= 1.0:
        raise UserError(
            f"entropy threshold {entropy_threshold} must be in (0, 1] (it is normalised by log E)"
        )
    return normalised_entropy(phi_SE) <= entropy_threshold
