"""The routing of mg-train's own samples, read from a routing cache, and what ties a plan to it.

The planner works per training sample: sample i of the GPTDataset (the order mg-train consumes,
step q taking samples [q·G, (q+1)·G)) becomes row i of topk_SLK, filled with the cache rows of
that sample's input tokens (padding is routed like position 0, as in training). Two
fingerprints let training refuse a plan made for something else:
- `cache_fingerprint`: the routing cache's identity (Grouter, dataset, k, E, window);
- `sample_order_fingerprint`: GPTDataset's sample and shuffle indices, which change with the
  sequence length, seed, split and requested sample count.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from megatron_grouter.data.sample_tokens import input_token_positions


def cache_fingerprint(manifest: dict) -> str:
    """sha256 of the manifest's identity fields (everything but the completion flag)."""
    identity = {key: value for key, value in manifest.items() if key != "complete"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def sample_order_fingerprint(gpt_dataset) -> str:
    """sha256 over GPTDataset's shuffle and sample indices (its sample order and packing)."""
    if gpt_dataset.shuffle_index is None:
        gpt_dataset._query_document_sample_shuffle_indices(0)  # loads the memory-mapped indices
    digest = hashlib.sha256()
    for array in (gpt_dataset.shuffle_index, gpt_dataset.sample_index, gpt_dataset.document_index):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def training_topk(gpt_dataset, cache, num_samples: int, chunk: int = 2048, progress: bool = True) -> np.ndarray:
    """Cached top-k expert ids of the input tokens of samples [0, num_samples): [S, L, K]."""
    from tqdm import tqdm

    seq_length = gpt_dataset.config.sequence_length
    topk_SLK = np.empty((num_samples, seq_length, cache.topk), dtype=cache.indices.dtype)
    with tqdm(total=num_samples, unit="sample", desc="routing", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, num_samples, chunk):
            ids = range(start, min(start + chunk, num_samples))
            positions_BS = input_token_positions(gpt_dataset, ids).clip(min=0)
            topk_SLK[start : start + len(ids)] = np.asarray(cache.indices[positions_BS.reshape(-1)]).reshape(
                len(ids), seq_length, cache.topk)
            bar.update(len(ids))
    return topk_SLK
