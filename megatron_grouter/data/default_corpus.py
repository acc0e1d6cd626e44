"""Preprocess a corpus once into an output directory: tokenizer + indexed dataset, idempotently.

`prepare_corpus` trains a byte-level BPE on the corpus (or uses a given tokenizer), tokenises
every document into `<out_dir>/<name>_text_document.bin/.idx`, and writes a stamp last. A second
call with the same parameters finds the stamp (and an intact dataset made with that tokenizer) and
returns at once. A lock file serialises processes that prepare the same directory together.
"""

from __future__ import annotations

import fcntl
import json
import logging
import platform
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from megatron_grouter.atomic_files import write_json_atomic
from megatron_grouter.data.corpus import STDLIB, iter_documents, resolve_corpus
from megatron_grouter.data.indexed import write_indexed_dataset
from megatron_grouter.data.integrity import verify_dataset
from megatron_grouter.data.tokenizer import load_tokenizer, train_byte_level_bpe
from megatron_grouter.errors import UserError

log = logging.getLogger("megatron_grouter")

# Train the BPE on every n-th document: a third of the stdlib (~10 MB) gives the same merges
# for a 4k vocabulary as all of it, in a third of the time.
BPE_SAMPLE_EVERY = 3


@dataclass
class DatasetPaths:
    """Where a prepared corpus lives; `reused` is True when nothing had to be done."""

    prefix: Path
    tokenizer_dir: Path
    reused: bool


@contextmanager
def _exclusive(directory: Path):
    with open(directory / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_complete(stamp: Path, params: dict, prefix: Path, tokenizer_dir: Path) -> bool:
    if not stamp.is_file():
        return False
    try:
        if json.loads(stamp.read_text()).get("params") != params:
            return False
        # Content too (cached after the first time): a damaged .bin is prepared again, not reused.
        verify_dataset(str(prefix), load_tokenizer(tokenizer_dir))
    except (json.JSONDecodeError, AttributeError, UserError) as problem:
        log.info("data: %s holds an unusable result (%s); preparing again", stamp.parent, problem)
        return False
    return True


def prepare_corpus(corpus: str, out_dir: str, vocab_size: int = 4096, tokenizer: str | None = None,
                   max_documents: int | None = None, jsonl_key: str = "text", workers: int | None = None,
                   progress: bool = True, suffixes: str | None = None) -> DatasetPaths:
    """Tokenizer + indexed dataset of `corpus` in `out_dir`, made once: an existing result with the
    same parameters is returned as is (reused=True). Without `tokenizer`, trains a byte-level BPE of
    `vocab_size` tokens on every BPE_SAMPLE_EVERY-th document. `corpus` is anything
    corpus.resolve_corpus reads; `jsonl_key` names the records' text field; `workers`: tokenising
    processes (None: one per core)."""
    out = Path(out_dir)
    # 'c4/*.json.gz' → 'c4': no glob characters or format suffixes in the dataset's file names.
    name = "stdlib" if corpus == STDLIB else (re.sub(r"[^A-Za-z0-9_-]+", "_", Path(corpus).name.split(".")[0])
                                              .strip("_") or "corpus")
    prefix = out / f"{name}_text_document"
    params = {"corpus": corpus if corpus == STDLIB else str(Path(corpus).resolve()),
              "vocab_size": vocab_size if tokenizer is None else None,
              "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
              "max_documents": max_documents, "jsonl_key": jsonl_key}
    if suffixes is not None:  # only then: stamps written before the option still match
        params["suffixes"] = suffixes
    if corpus == STDLIB:  # the running interpreter's stdlib: another Python is another corpus
        params["python"] = platform.python_version()
    stamp = out / "prepared.json"
    tokenizer_dir = Path(tokenizer) if tokenizer else out / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if _is_complete(stamp, params, prefix, tokenizer_dir):
            log.info("data: reusing %s (prepared earlier with the same parameters)", prefix)
            return DatasetPaths(prefix, tokenizer_dir, reused=True)
        stamp.unlink(missing_ok=True)
        started = time.perf_counter()
        plan = resolve_corpus(corpus, jsonl_key, suffixes)
        if plan.skipped or plan.notes:
            log.info("data: %s", plan.summary())
        if tokenizer is None:
            texts = (document.text for document in islice(iter_documents(plan, jsonl_key, max_documents),
                                                          0, None, BPE_SAMPLE_EVERY))
            tok = train_byte_level_bpe(texts, vocab_size, tokenizer_dir)
            log.info("data: trained a %d-token byte-level BPE on every %d. document of %s in %.1fs",
                     tok.vocab_size, BPE_SAMPLE_EVERY, corpus, time.perf_counter() - started)
        else:
            tok = load_tokenizer(tokenizer)
        started = time.perf_counter()
        info = write_indexed_dataset(iter_documents(plan, jsonl_key, max_documents), tok, str(prefix),
                                     source=corpus, workers=workers, progress=progress,
                                     extra_meta={"skipped": plan.skipped_counts()})
        log.info("data: %d documents, %d tokens -> %s.bin/.idx in %.1fs (%d undecodable characters "
                 "replaced)", info.num_documents, info.num_tokens, prefix, time.perf_counter() - started,
                 info.replaced_chars)
        write_json_atomic(stamp, {"params": params, "num_tokens": info.num_tokens})
    return DatasetPaths(prefix, tokenizer_dir, reused=False)


def prepare_default_corpus(out_dir: str, vocab_size: int = 4096, max_documents: int | None = None) -> DatasetPaths:
    """The built-in corpus: this machine's Python standard library."""
    return prepare_corpus(STDLIB, out_dir, vocab_size=vocab_size, max_documents=max_documents)
