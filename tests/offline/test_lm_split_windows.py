"""The offline tools keep to the LM's train documents: distillation/tuning windows (WindowBatches with
lm_split) never come from the documents mg-train validates or tests on, and the split ranges are the
ones megatron's GPTDataset builder uses."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_grouter.data.gpt_datasets import build_gpt_datasets
from megatron_grouter.data.lm_split import split_ranges, train_documents
from megatron_grouter.data.tokenizer import load_tokenizer
from megatron_grouter.errors import UserError
from megatron_grouter.offline.window_data import WindowBatches
from tests.tiny_dataset import tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("lm_split"), documents=60)


def _documents_of(batches: WindowBatches) -> set[int]:
    return set((np.searchsorted(batches.windows.starts_D, batches.starts, side="right") - 1).tolist())


def test_ranges_match_megatrons_split(data):
    tokenizer = load_tokenizer(data["tokenizer"])
    _, valid, test = build_gpt_datasets(data["prefix"], tokenizer, seq_length=16, seed=1, split="70,20,10",
                                        num_samples=(8, 8, 8), cache_dir=data["out_dir"] + "/cache")
    ranges = split_ranges(60, "70,20,10")
    for dataset, name in ((valid, "valid"), (test, "test")):
        used = set(np.unique(dataset.document_index).tolist())
        assert used == set(range(*ranges[name]))
    assert ranges["train"] == (0, 42)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_windows_leave_out_the_lm_valid_and_test_documents(data, split):
    everything = WindowBatches(data["prefix"], 16, 4, seed=0, split=split)
    kept = WindowBatches(data["prefix"], 16, 4, seed=0, split=split, lm_split="70,20,10")
    first_held_out = split_ranges(60, "70,20,10")["valid"][0]
    assert max(_documents_of(everything)) >= first_held_out  # without it the tools read them
    assert max(_documents_of(kept)) < first_held_out
    assert _documents_of(kept) == {doc for doc in _documents_of(everything) if doc < first_held_out}


def test_bad_split_is_one_line():
    with pytest.raises(UserError, match="not like '96,2,2'"):
        train_documents(10, "a,b")
    with pytest.raises(UserError, match="not like '96,2,2'"):
        split_ranges(10, "0,0,0")
    with pytest.raises(UserError, match="no training documents"):
        train_documents(10, "0,50,50")
