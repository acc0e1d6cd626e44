"""Synthetic routing with known structure, for tests and benchmarks of the planner.

`planted_block_routing`: every sample has one latent topic; topic j prefers the j-th block of
E / topics experts, where blocks are a random shuffle of the expert ids (so Megatron's contiguous
default layout does not match them by accident). Each token takes the top-k of (strength · [expert in block] + Gumbel noise),
so the planner should recover the blocks as expert groups.

`mixed_skill_routing`: closer to real routers. Tokens draw a latent skill from their sample's
Dirichlet mixture over topics; every skill prefers a random, overlapping subset of experts and
experts have uneven popularity. Sample affinity is blurred while token co-activation still has
structure, which is where sample-level clustering alone falls short.
"""

from __future__ import annotations

import numpy as np


def _gumbel_topk(logits_TE: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    noisy_TE = logits_TE + rng.gumbel(size=logits_TE.shape)
    return np.argpartition(-noisy_TE, k - 1, axis=1)[:, :k]


def planted_block_routing(
    num_samples: int = 2048,
    tokens_per_sample: int = 64,
    num_experts: int = 32,
    top_k: int = 4,
    num_topics: int = 8,
    strength: float = 3.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(topk_SLK uint8, block_E): routing whose samples each favour one block; block of each expert."""
    rng = np.random.default_rng(seed)
    block_E = rng.permutation(np.arange(num_experts) // (num_experts // num_topics))
    topic_S = rng.integers(0, num_topics, num_samples)
    logits_TE = strength * (block_E[None, :] == np.repeat(topic_S, tokens_per_sample)[:, None])
    topk_TK = _gumbel_topk(logits_TE, top_k, rng)
    return topk_TK.reshape(num_samples, tokens_per_sample, top_k).astype(np.uint8), block_E


def mixed_skill_routing(
    num_samples: int = 4096,
    tokens_per_sample: int = 128,
    num_experts: int = 32,
    top_k: int = 4,
    num_topics: int = 16,
    num_skills: int = 24,
    experts_per_skill: int = 6,
    skill_strength: float = 2.5,
    concentration: float = 0.3,
    seed: int = 0,
) -> np.ndarray:
    """topk_SLK uint8 with token-level skills mixed per sample (see module docstring)."""
    rng = np.random.default_rng(seed)
    popularity_E = rng.normal(0.0, 0.5, num_experts)
    skill_XE = np.zeros((num_skills, num_experts))
    for skill in range(num_skills):
        skill_XE[skill, rng.choice(num_experts, experts_per_skill, replace=False)] = skill_strength
    topic_skills_JX = rng.dirichlet(np.full(num_skills, 0.2), num_topics)
    sample_topics_SJ = rng.dirichlet(np.full(num_topics, concentration), num_samples)
    skill_mix_SX = sample_topics_SJ @ topic_skills_JX
    cumulative_SX = np.cumsum(skill_mix_SX, axis=1)
    draws_SL = rng.random((num_samples, tokens_per_sample))
    skill_SL = np.minimum((draws_SL[..., None] > cumulative_SX[:, None, :]).sum(axis=2), num_skills - 1)
    logits_TE = popularity_E[None, :] + skill_XE[skill_SL.ravel()]
    topk_TK = _gumbel_topk(logits_TE, top_k, rng)
    return topk_TK.reshape(num_samples, tokens_per_sample, top_k).astype(np.uint8)
