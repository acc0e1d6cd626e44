"""Shared fixtures: the default corpus (prepared once per session), in-process and torchrun runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def stdlib_data() -> dict:
    """The built-in corpus, preprocessed once into data/stdlib-py<X.Y>: it is this interpreter's
    standard library, so each test lane (Python 3.11, 3.12) has its own."""
    from megatron_grouter.data.default_corpus import prepare_default_corpus

    out_dir = REPO / "data" / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    paths = prepare_default_corpus(str(out_dir), vocab_size=4096)
    return {"prefix": str(paths.prefix), "tokenizer": str(paths.tokenizer_dir), "out_dir": str(out_dir)}
