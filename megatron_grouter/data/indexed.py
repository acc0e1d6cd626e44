"""Documents → megatron indexed dataset ({prefix}.bin/.idx) plus {prefix}.meta.json.

The .bin/.idx pair is written under temporary names and renamed into place (.idx last), so a
killed run never leaves a pair that looks complete. The meta file records the tokenizer's
fingerprint: training and the Grouter tools refuse a dataset made with another tokenizer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from megatron_grouter.data.corpus import Document
from megatron_grouter.data.tokenizer import Tokenizer
from megatron_grouter.errors import UserError


@dataclass
class IndexedInfo:
    prefix: str
    num_documents: int
    num_tokens: int
    replaced_chars: int


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


def write_indexed_dataset(documents: Iterable[Document], tokenizer: Tokenizer, output_prefix: str,
                          source: str = "", append_eod: bool = True, batch_size: int = 64,
                          progress: bool = True) -> IndexedInfo:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=token_dtype(tokenizer.vocab_size))
    num_documents = num_tokens = replaced = 0
    started = time.perf_counter()
    bar = tqdm(desc="tokenize", unit="doc", disable=not progress, mininterval=1.0)

    def flush(batch: list[Document]) -> None:
        nonlocal num_documents, num_tokens
        for ids in tokenizer.encode_batch([document.text for document in batch]):
            if append_eod:
                ids.append(tokenizer.eod_id)
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            num_documents += 1
            num_tokens += len(ids)
        bar.update(len(batch))
        bar.set_postfix(tok_per_s=f"{num_tokens / max(time.perf_counter() - started, 1e-9):.0f}")

    batch: list[Document] = []
    for document in documents:
        replaced += document.replaced_chars
        batch.append(document)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    builder.finalize(tmp_prefix + ".idx")
    meta = {"tokenizer": tokenizer.fingerprint(), "num_documents": num_documents,
            "num_tokens": num_tokens, "source": source, "replaced_chars": replaced,
            "append_eod": append_eod}
    Path(tmp_prefix + ".meta.json").write_text(json.dumps(meta, indent=2))
    os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
    os.replace(tmp_prefix + ".meta.json", output_prefix + ".meta.json")
    os.replace(tmp_prefix + ".idx", output_prefix + ".idx")
    return IndexedInfo(output_prefix, num_documents, num_tokens, replaced)


def read_dataset_meta(prefix: str) -> dict:
    for suffix in (".bin", ".idx", ".meta.json"):
        if not Path(prefix + suffix).is_file():
            raise UserError(f"{prefix}{suffix} not found; preprocess the corpus with mg-preprocess "
                            "or fix data.prefix")
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    item_size = np.dtype(token_dtype(meta["tokenizer"]["vocab_size"])).itemsize
    actual = Path(prefix + ".bin").stat().st_size
    if actual != meta["num_tokens"] * item_size:
        raise UserError(f"{prefix}.bin has {actual} bytes but its index describes "
                        f"{meta['num_tokens'] * item_size}; the file is truncated or corrupted — "
                        "preprocess again")
    return meta


def check_dataset_tokenizer(prefix: str, tokenizer: Tokenizer) -> dict:
    meta = read_dataset_meta(prefix)
    if meta["tokenizer"] != tokenizer.fingerprint():
        raise UserError(f"dataset {prefix} was tokenised with another tokenizer (sha "
                        f"{meta['tokenizer']['sha256'][:12]}, vocab {meta['tokenizer']['vocab_size']}) "
                        f"than {tokenizer.path} (sha {tokenizer.fingerprint()['sha256'][:12]}); "
                        "preprocess again with this tokenizer or point at the right one")
    return meta
