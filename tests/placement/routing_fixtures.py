"""Small random routing instances shared by the placement tests."""

from __future__ import annotations

import numpy as np


def random_routing(num_samples: int, tokens: int, num_experts: int, k: int, seed: int) -> np.ndarray:
    """topk_SLK with K distinct uniformly random experts per token."""
    rng = np.random.default_rng(seed)
    scores = rng.random((num_samples * tokens, num_experts))
    return np.argsort(scores, axis=1)[:, :k].reshape(num_samples, tokens, k).astype(np.int16)


def random_equal_groups(num_experts: int, num_groups: int, seed: int) -> np.ndarray:
    """A random expert→group map with E/N experts per group."""
    return np.random.default_rng(seed).permutation(np.arange(num_experts) // (num_experts // num_groups))
