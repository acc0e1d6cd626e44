"""The balanced hash layer baseline: a fixed token-id → k experts table, built offline.

Tokens are taken in descending frequency and each gets the k currently least-loaded distinct
experts (longest-processing-time-first scheduling), so expert loads on the corpus balance as
well as its most frequent tokens allow. The gate weights are learned by the layer's own gate
(HybridRouter), as in the paper's baseline. Counts come from the LM's train documents only.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path

import numpy as np

from megatron_grouter.errors import UserError


def token_frequencies(prefix: str, vocab_size: int, lm_split: str | None) -> np.ndarray:
    """[V] token counts over the LM's train documents of `prefix` (data/lm_split.py; every document
    when `lm_split` is None): the table never sees the documents the LM is evaluated on."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_grouter.data.lm_split import train_documents

    index = IndexedDataset(prefix, mmap=True).index
    tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
    starts_D = np.asarray(index.sequence_pointers, dtype=np.int64) // index.dtype_size
    lengths_D = np.asarray(index.sequence_lengths, dtype=np.int64)
    counts_V = np.zeros(vocab_size, dtype=np.int64)
    keep_D = train_documents(len(starts_D), lm_split)
    # Split ranges are contiguous: count each run of kept documents in one bincount.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep_D.astype(np.int8), [0]])))
    for first, end in zip(edges[0::2], edges[1::2]):
        span = tokens[starts_D[first]:starts_D[end - 1] + lengths_D[end - 1]]
        counts_V += np.bincount(span, minlength=vocab_size)[:vocab_size]
    return counts_V


def balanced_hash_table(counts_V: np.ndarray, num_experts: int, topk: int, seed: int = 0) -> np.ndarray:
    """[V, k] expert ids; every token's k experts are distinct."""
    if topk > num_experts:
        raise UserError(f"hash routing needs topk ≤ experts, got topk={topk}, experts={num_experts}")
    rng = np.random.default_rng(seed)
    tie_break = rng.permutation(num_experts)
    heap = [(0, int(tie_break[expert]), expert) for expert in range(num_experts)]
    heapq.heapify(heap)
    table_VK = np.zeros((len(counts_V), topk), dtype=np.int64)
    order = np.lexsort((rng.permutation(len(counts_V)), -counts_V))
    for token in order:
        chosen = [heapq.heappop(heap) for _ in range(topk)]
        table_VK[token] = [expert for _, _, expert in chosen]
        for load, tie, expert in chosen:
            heapq.heappush(heap, (load + int(counts_V[token]), tie, expert))
    return table_VK


def expert_loads(table_VK: np.ndarray, counts_V: np.ndarray, num_experts: int) -> np.ndarray:
    return np.bincount(table_VK.reshape(-1), weights=np.repeat(counts_V, table_VK.shape[1]),
                       minlength=num_experts)


def save_table(path: Path, table_VK: np.ndarray, meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, table=table_VK, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    tmp.replace(path)


def load_table(path: Path, num_experts: int, topk: int, vocab_size: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hash table {path} does not exist; leave router.hash.table unset to build one")
    with np.load(path) as archive:
        table_VK = archive["table"]
    if table_VK.shape[1] != topk or table_VK.max() >= num_experts or table_VK.shape[0] < vocab_size:
        raise UserError(f"hash table {path} is for {table_VK.shape[0]} tokens × top-{table_VK.shape[1]}"
                        f" over {int(table_VK.max()) + 1}+ experts, not this model (vocab {vocab_size},"
                        f" top-{topk}, {num_experts} experts); rebuild it")
    return table_VK
