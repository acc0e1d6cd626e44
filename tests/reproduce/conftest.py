"""Fixtures of the mg-reproduce tests: a small slice of the built-in corpus and two real runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def micro_corpus() -> dict:
    """The first 100 stdlib documents with a 512-token BPE, prepared once into
    data/stdlib-micro-py<X.Y> (this interpreter's stdlib: one per test lane)."""
    from megatron_grouter.data.default_corpus import prepare_default_corpus

    out_dir = REPO / "data" / f"stdlib-micro-py{sys.version_info.major}.{sys.version_info.minor}"
    paths = prepare_default_corpus(str(out_dir), vocab_size=512, max_documents=100)
    return {"prefix": str(paths.prefix), "tokenizer": str(paths.tokenizer_dir), "out_dir": str(out_dir)}


@pytest.fixture(scope="session")
def two_runs(micro_corpus, tmp_path_factory) -> dict:
    """Real mg-train runs of the micro model: 12 steps (checkpoints every 4) and 4 steps."""
    from tests.train_runs import data_overrides, train_in_process

    from tests.reproduce.reproduce_runs import MICRO_SHAPE

    root = tmp_path_factory.mktemp("runs")
    shape = [*MICRO_SHAPE, "model.num_experts=4"]
    runs = {}
    for name, steps in (("long", 12), ("short", 4)):
        out_dir = root / name
        train_in_process([*data_overrides(micro_corpus), *shape, f"train.steps={steps}",
                          "train.eval_interval=2", "train.save_interval=4", f"train.out_dir={out_dir}"])
        runs[name] = out_dir
    return runs
