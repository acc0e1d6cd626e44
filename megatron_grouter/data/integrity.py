"""Is the .bin still what mg-preprocess wrote? Content hash and token-id range, checked once.

Flipped bytes in a .bin keep its size, so the size check of `read_dataset_meta` passes and the
model trains on garbage (ids ≥ vocab crash deep inside the embedding, ids < vocab train without
a word). mg-preprocess records the .bin's sha256 and largest id in the meta; before training,
`verify_dataset_content` reads the .bin once (one pass: sha256 + min/max id) and refuses, in one
line, a .bin whose hash differs or whose ids fall outside the tokenizer.

Reading a large .bin costs seconds, so a passed check is cached in {prefix}.verified.json, keyed
by the .idx hash and the .bin's size and modification time (any write to the .bin changes its
mtime, so a later edit is checked again). A dataset from before content hashes were recorded is
range-checked only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_grouter.atomic_files import write_json_atomic
from megatron_grouter.errors import UserError

log = logging.getLogger("megatron_grouter")

CHUNK_BYTES = 1 << 24
CACHE_SUFFIX = ".verified.json"


@dataclass
class BinScan:
    """One pass over a .bin: its sha256, token count and smallest / largest id (-1 when empty)."""

    sha256: str
    num_tokens: int
    min_id: int
    max_id: int
    out_of_range: int = 0  # ids ≥ the vocabulary checked against (or < 0)


def scan_bin(path: str | Path, dtype, vocab_size: int | None = None) -> BinScan:
    """sha256 and id range of a token .bin, read in chunks (memory stays flat)."""
    dtype = np.dtype(dtype)
    digest = hashlib.sha256()
    count, low, high, bad = 0, None, None, 0
    chunk = CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            ids = np.frombuffer(block[:len(block) - len(block) % dtype.itemsize], dtype=dtype)
            if ids.size:
                count += ids.size
                block_low, block_high = int(ids.min()), int(ids.max())
                low = block_low if low is None else min(low, block_low)
                high = block_high if high is None else max(high, block_high)
                if vocab_size is not None and (block_high >= vocab_size or block_low < 0):
                    bad += int(np.count_nonzero((ids >= vocab_size) | (ids < 0)))
    return BinScan(digest.hexdigest(), count, -1 if low is None else low, -1 if high is None else high, bad)


def _cache_key(prefix: str, vocab_size: int) -> dict:
    bin_stat = Path(prefix + ".bin").stat()
    return {"idx_sha256": hashlib.sha256(Path(prefix + ".idx").read_bytes()).hexdigest(),
            "bin_size": bin_stat.st_size, "bin_mtime_ns": bin_stat.st_mtime_ns, "vocab_size": vocab_size}


def _read_cache(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_cache(path: Path, record: dict) -> None:
    try:
        write_json_atomic(path, record)
    except OSError as error:  # a read-only dataset directory: check again next time
        log.info("data: could not record the content check in %s (%s)", path, error.strerror)


def verify_dataset_content(prefix: str, vocab_size: int, meta: dict, dtype) -> BinScan | None:
    """Refuse (one line) a .bin whose content hash differs from the one its meta records, or
    whose ids are outside [0, vocab_size); returns the scan, or None when a cached check of the
    same files passed."""
    prefix = str(prefix)
    cache_path = Path(prefix + CACHE_SUFFIX)
    key = _cache_key(prefix, vocab_size)
    cached = _read_cache(cache_path)
    if cached is not None and cached.get("key") == key and cached.get("passed"):
        return None
    started = time.perf_counter()
    scan = scan_bin(prefix + ".bin", dtype, vocab_size)
    recorded = meta.get("bin_sha256")
    changed = recorded is not None and recorded != scan.sha256
    if changed or scan.out_of_range:
        problems = []
        if changed:
            problems.append(f"its content hash (sha256 {scan.sha256[:12]}) differs from the one recorded "
                            f"when it was written ({recorded[:12]}): the file was modified or damaged "
                            "(or its .meta.json was copied from another dataset)")
        if scan.out_of_range:
            problems.append(f"{scan.out_of_range} of its {scan.num_tokens} token ids are outside the "
                            f"tokenizer's {vocab_size} (ids {scan.min_id}..{scan.max_id})")
        raise UserError(f"dataset {prefix}.bin cannot be used: {'; '.join(problems)}; preprocess "
                        "the corpus again (mg-preprocess) or restore the file")
    if recorded is None:
        log.info("data: %s.meta.json records no content hash (made by an older mg-preprocess): token ids "
                 "range-checked only; preprocess again to record one", prefix)
    _write_cache(cache_path, {"key": key, "passed": True, "bin_sha256": scan.sha256,
                              "max_token_id": scan.max_id})
    log.info("data: checked %s.bin (%d tokens, ids %d..%d < %d%s) in %.1fs", prefix, scan.num_tokens,
             scan.min_id, scan.max_id, vocab_size, ", content hash matches" if recorded else "",
             time.perf_counter() - started)
    return scan


def verify_dataset(prefix: str, tokenizer) -> dict:
    """Everything training checks before it reads a dataset: files present and consistent, made
    with `tokenizer`, content unchanged and ids in range. Returns the meta record."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    from megatron_grouter.data.indexed import check_meta_tokenizer

    meta = check_meta_tokenizer(prefix, tokenizer)  # also refuses an unreadable .idx
    dtype = _IndexReader(str(prefix) + ".idx", multimodal=False).dtype
    verify_dataset_content(prefix, tokenizer.vocab_size, meta, dtype)
    return meta
