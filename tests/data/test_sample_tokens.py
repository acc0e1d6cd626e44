"""The batch → token-position mapping (data/sample_tokens.py) that preemptive routing is looked up by:
each input position must hold exactly that input token in the .bin (never the next one, which would
leak token t+1 into token t's routing)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_grouter.data.gpt_datasets import build_gpt_datasets
from megatron_grouter.data.sample_tokens import PAD, input_token_positions, sample_token_positions
from megatron_grouter.data.tokenizer import load_tokenizer
from tests.tiny_dataset import tiny_dataset


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    data = tiny_dataset(tmp_path_factory.mktemp("sample_tokens"), documents=30)
    tokenizer = load_tokenizer(data["tokenizer"])
    train, valid, _ = build_gpt_datasets(data["prefix"], tokenizer, seq_length=24, seed=7, split="80,10,10",
                                         num_samples=(64, 16, 0), cache_dir=data["out_dir"] + "/cache")
    tokens = np.memmap(data["prefix"] + ".bin", dtype=train.dataset.index.dtype, mode="r")
    return {"train": train, "valid": valid, "bin": np.asarray(tokens)}


@pytest.mark.parametrize("split", ["train", "valid"])
def test_positions_hold_the_sample_tokens(datasets, split):
    dataset, bin_tokens = datasets[split], datasets["bin"]
    ids = list(range(min(len(dataset), 24)))
    positions_BS = input_token_positions(dataset, ids)
    assert positions_BS.shape == (len(ids), 24)
    crossed_documents = 0
    for row, index in enumerate(ids):
        sample = dataset[index]
        inputs, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        positions = positions_BS[row]
        real = positions != PAD
        # Input token t sits at its own position: bin[pos[t]] == tokens[t] ...
        np.testing.assert_array_equal(bin_tokens[positions[real]], inputs[real])
        # ... and the full sample (inputs + the extra label token) is the .bin at sample_token_positions.
        full = sample_token_positions(dataset, index)
        keep = full != PAD
        np.testing.assert_array_equal(bin_tokens[full[keep]], np.concatenate([inputs, labels[-1:]])[keep])
        crossed_documents += int((np.diff(full[keep]) != 1).any())
    assert crossed_documents > 0  # samples span document boundaries: the pieces are stitched right


def test_a_one_token_shift_would_be_caught(datasets):
    """The data is not degenerate: positions shifted by one (token t+1 in place of t) would give the
    labels, not the inputs, so the test above fails on an off-by-one."""
    dataset, bin_tokens = datasets["train"], datasets["bin"]
    positions_BS = input_token_positions(dataset, range(8))
    inputs_BS = np.stack([dataset[index]["tokens"].numpy() for index in range(8)])
    labels_BS = np.stack([dataset[index]["labels"].numpy() for index in range(8)])
    shifted = bin_tokens[np.clip(positions_BS + 1, 0, len(bin_tokens) - 1)]
    assert (shifted != inputs_BS).mean() > 0.5
    within = np.diff(positions_BS, axis=1) == 1  # next input inside the same document
    np.testing.assert_array_equal(shifted[:, :-1][within], labels_BS[:, :-1][within])
