"""Documents → megatron indexed dataset ({prefix}.bin/.idx) plus {prefix}.meta.json.

The .bin/.idx pair is written under temporary names and renamed into place (.idx last), so a
killed run never leaves a pair that looks complete. The meta file records the tokenizer's
fingerprint: training and the Grouter tools refuse a dataset made with another tokenizer.

Tokenisation runs in the calling process (the `tokenizers` backend already uses its own threads)
or, with workers > 1 (mg-preprocess: one per core), in a pool of processes that each load the
tokenizer from its file; at most a few batches are in flight and results are written in document
order, so the dataset is byte-identical whatever the worker count.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from megatron_grouter.atomic_files import publish_file
from megatron_grouter.data.chunked_encoding import encode_arrays
from megatron_grouter.data.corpus import Document
from megatron_grouter.data.output_dirs import removed_if_failed
from megatron_grouter.data.tokenizer import Tokenizer, load_tokenizer
from megatron_grouter.errors import UserError

# Batches queued per worker: enough to keep every worker busy, few enough to bound memory.
BATCHES_IN_FLIGHT_PER_WORKER = 4


@dataclass
class IndexedInfo:
    """What `write_indexed_dataset` wrote."""

    prefix: str
    num_documents: int
    num_tokens: int
    replaced_chars: int


def token_dtype(vocab_size: int) -> type:
    """Storage dtype of token ids: 2 bytes while the ids fit, else 4."""
    return np.uint16 if vocab_size < 65500 else np.int32


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_worker_tokenizer: Tokenizer | None = None


def _pack(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids as one int32 array, length of each document): cheap to send between processes
    (raw bytes, where a list of Python ints pickles item by item). Long texts are encoded in
    pieces (data/chunked_encoding.py), so memory stays a few times the text."""
    arrays = encode_arrays(tokenizer, texts)
    lengths = np.array([len(ids) for ids in arrays], dtype=np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return flat, lengths


def _encode_in_worker(texts: list[str], tokenizer_path: str, sha256: str) -> tuple[np.ndarray, np.ndarray]:
    global _worker_tokenizer
    if _worker_tokenizer is None:
        # One process per core already; the backend's own thread pool would only oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _worker_tokenizer = load_tokenizer(tokenizer_path)
    if _worker_tokenizer.sha256 != sha256:
        raise UserError(f"{tokenizer_path} changed while tokenising; run again once it is stable")
    return _pack(_worker_tokenizer, texts)


def _encoded_batches(batches: Iterator[list[Document]], tokenizer: Tokenizer,
                     workers: int) -> Iterator[tuple[list[Document], tuple[np.ndarray, np.ndarray]]]:
    """(batch, (ids, lengths)) in the order of `batches`.

    A pool of `workers` processes with at most BATCHES_IN_FLIGHT_PER_WORKER batches each in
    flight, results taken in submission order. (Pool.imap would keep the order too, but its
    feeder thread reads the whole corpus ahead into memory.) A corpus that fits in the first
    round of batches is tokenised here: starting the pool would cost more than it saves.
    """
    if workers > 1:
        head = list(islice(batches, workers))
        if len(head) < workers:  # small corpus: no pool
            batches, workers = iter(head), 1
        else:
            batches = chain(head, batches)
    if workers <= 1:
        for batch in batches:
            yield batch, _pack(tokenizer, [document.text for document in batch])
        return
    # spawn, not fork: a forked child inherits the parent's tokenizers thread pool in a broken state.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        pending: deque = deque()
        for batch in batches:
            texts = [document.text for document in batch]
            task = pool.apply_async(_encode_in_worker, (texts, str(tokenizer.path), tokenizer.sha256))
            pending.append((batch, task))
            if len(pending) >= workers * BATCHES_IN_FLIGHT_PER_WORKER:
                done_batch, result = pending.popleft()
                yield done_batch, result.get()
        while pending:
            done_batch, result = pending.popleft()
            yield done_batch, result.get()


def _batched(documents: Iterable[Document], batch_size: int) -> Iterator[list[Document]]:
    iterator = iter(documents)
    while batch := list(islice(iterator, batch_size)):
        yield batch


def write_indexed_dataset(documents: Iterable[Document], tokenizer: Tokenizer, output_prefix: str,
                          source: str = "", append_eod: bool = True, workers: int | None = 1,
                          batch_size: int = 64, progress: bool = True,
                          extra_meta: dict | None = None) -> IndexedInfo:
    """Tokenise `documents` (one indexed-dataset document each, EOD appended) into
    {output_prefix}.bin/.idx/.meta.json, atomically; `source` is recorded in the meta file, with
    the .bin's sha256 and largest token id (what training verifies: data/integrity.py).
    `workers`: tokenising processes; None: one per usable core. A failure leaves no new empty
    output directory behind."""
    workers = usable_cores() if workers is None else workers
    if workers < 1:
        raise UserError(f"workers={workers}; use 1 (tokenise in this process) or more")
    output_prefix = str(output_prefix)
    with removed_if_failed(Path(output_prefix).parent):
        Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
        return _write_indexed_dataset(documents, tokenizer, output_prefix, source, append_eod, workers,
                                      batch_size, progress, extra_meta)


def _write_indexed_dataset(documents: Iterable[Document], tokenizer: Tokenizer, output_prefix: str,
                           source: str, append_eod: bool, workers: int, batch_size: int, progress: bool,
                           extra_meta: dict | None) -> IndexedInfo:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    from megatron_grouter.data.integrity import scan_bin

    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    tmp_files = [tmp_prefix + suffix for suffix in (".bin", ".idx", ".meta.json")]
    num_documents = num_tokens = replaced = 0
    started = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    try:
        builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
        with tqdm(desc="tokenize", unit="doc", disable=not progress, mininterval=1.0) as bar:
            for batch, (ids, lengths) in _encoded_batches(_batched(documents, batch_size), tokenizer,
                                                          workers):
                ends = np.cumsum(lengths)
                for document, end, length in zip(batch, ends.tolist(), lengths.tolist()):
                    tokens = ids[end - length:end]
                    if append_eod:
                        tokens = np.append(tokens, tokenizer.eod_id)
                    builder.add_item(torch.from_numpy(tokens))
                    builder.end_document()
                    num_documents += 1
                    num_tokens += len(tokens)
                    replaced += document.replaced_chars
                bar.update(len(batch))
                bar.set_postfix(tok_per_s=f"{num_tokens / max(time.perf_counter() - started, 1e-9):.0f}")
        builder.finalize(tmp_prefix + ".idx")
        content = scan_bin(tmp_prefix + ".bin", dtype)
        meta = {"tokenizer": tokenizer.fingerprint(), "num_documents": num_documents,
                "num_tokens": num_tokens, "source": source, "replaced_chars": replaced,
                "append_eod": append_eod, "bin_sha256": content.sha256,
                "max_token_id": content.max_id, **(extra_meta or {})}
        Path(tmp_prefix + ".meta.json").write_text(json.dumps(meta, indent=2))
        for suffix in (".bin", ".meta.json", ".idx"):
            publish_file(tmp_prefix + suffix, output_prefix + suffix)
    finally:
        for leftover in tmp_files:
            Path(leftover).unlink(missing_ok=True)
    return IndexedInfo(output_prefix, num_documents, num_tokens, replaced)


def _index_counts(prefix: str) -> tuple[int, int, int]:
    """(tokens, documents described by {prefix}.idx, bytes per token) as megatron reads the index."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        index = _IndexReader(prefix + ".idx", multimodal=False)
    except Exception as error:  # megatron asserts on a bad header, numpy raises on a short file
        raise UserError(f"{prefix}.idx cannot be read ({type(error).__name__}); the file is corrupted — "
                        "preprocess again") from None
    return (int(index.sequence_lengths.sum(dtype=np.int64)), len(index.document_indices) - 1,
            np.dtype(index.dtype).itemsize)


def read_dataset_meta(prefix: str) -> dict:
    """The meta record of dataset `prefix`, after checking that .bin, .idx and .meta.json exist
    and that the .bin holds exactly the tokens its index describes."""
    prefix = str(prefix)
    for suffix in (".bin", ".idx", ".meta.json"):
        if not Path(prefix + suffix).is_file():
            raise UserError(f"{prefix}{suffix} not found; preprocess the corpus with mg-preprocess "
                            "or fix data.prefix")
    try:
        meta = json.loads(Path(prefix + ".meta.json").read_text())
        meta["tokenizer"]["sha256"], meta["num_tokens"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{prefix}.meta.json is not a dataset meta record; preprocess again") from None
    index_tokens, index_documents, item_size = _index_counts(prefix)
    actual = Path(prefix + ".bin").stat().st_size
    if actual != index_tokens * item_size:
        raise UserError(f"{prefix}.bin has {actual} bytes but its index describes "
                        f"{index_tokens * item_size} ({index_tokens} tokens); the file is truncated or "
                        "corrupted — preprocess again")
    recorded_documents = meta.get("num_documents", index_documents)
    if index_tokens != meta["num_tokens"] or recorded_documents != index_documents:
        raise UserError(f"{prefix}.meta.json belongs to another dataset or tokenizer: it describes "
                        f"{meta['num_tokens']} tokens in {recorded_documents} documents (tokenizer sha "
                        f"{str(meta['tokenizer'].get('sha256'))[:12]}) but {prefix}.bin/.idx hold "
                        f"{index_tokens} tokens in {index_documents} documents and agree with each other; "
                        "put back the .meta.json written with them, or preprocess again")
    return meta


def check_dataset_tokenizer(prefix: str, tokenizer: Tokenizer) -> dict:
    """What every tool checks before it reads a dataset: `read_dataset_meta`, the tokenizer, and the
    .bin's content against its recorded sha256 with ids in range (once, then remembered:
    data/integrity.py). Returns the meta record."""
    from megatron_grouter.data.integrity import verify_dataset

    return verify_dataset(prefix, tokenizer)


def check_meta_tokenizer(prefix: str, tokenizer: Tokenizer) -> dict:
    """`read_dataset_meta`, refusing a dataset that was tokenised with another tokenizer."""
    meta = read_dataset_meta(prefix)
    if meta["tokenizer"] != tokenizer.fingerprint():
        raise UserError(f"dataset {prefix} was tokenised with another tokenizer (sha "
                        f"{meta['tokenizer']['sha256'][:12]}, vocab {meta['tokenizer']['vocab_size']}) "
                        f"than {tokenizer.path} (sha {tokenizer.sha256[:12]}, vocab "
                        f"{tokenizer.vocab_size}); re-run mg-preprocess with this tokenizer or point "
                        "data.tokenizer at the one the dataset was made with")
    return meta
