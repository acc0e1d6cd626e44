"""A .bin changed after mg-preprocess (flipped bytes, ids beyond the vocabulary) is refused in
one line before training; a passed check is not paid for twice."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_grouter.data.integrity import CACHE_SUFFIX, scan_bin, verify_dataset
from megatron_grouter.data.tokenizer import load_tokenizer
from megatron_grouter.errors import UserError
from tests.tiny_dataset import TINY_MODEL, tiny_dataset
from tests.train_runs import data_overrides, train_in_process


@pytest.fixture()
def data(tmp_path):
    return tiny_dataset(tmp_path / "data")


def flip_bytes(path: str, offsets) -> None:
    with open(path, "r+b") as handle:
        for offset in offsets:
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_bytes_are_refused_before_training(data, tmp_path):
    flip_bytes(data["prefix"] + ".bin", [10])
    out_dir = tmp_path / "run"
    with pytest.raises(UserError) as refused:
        train_in_process([*data_overrides(data), *TINY_MODEL, "train.steps=1", f"train.out_dir={out_dir}"])
    assert "content hash" in str(refused.value) and "\n" not in str(refused.value)
    assert not out_dir.exists()  # refused before anything was written


def test_ids_beyond_the_vocabulary_are_refused(data):
    tokenizer = load_tokenizer(data["tokenizer"])
    bin_path = data["prefix"] + ".bin"
    ids = np.fromfile(bin_path, dtype=np.uint16)
    ids[[3, 50]] = 60000  # as a dataset from another tool, or made with a larger tokenizer, holds
    ids.tofile(bin_path)
    meta_path = Path(data["prefix"] + ".meta.json")
    meta = json.loads(meta_path.read_text())
    meta["bin_sha256"] = scan_bin(bin_path, np.uint16).sha256  # its meta agrees with the file
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"2 of its {ids.size} token ids are outside the tokenizer's "
                                        f"{tokenizer.vocab_size}"):
        verify_dataset(data["prefix"], tokenizer)
    del meta["bin_sha256"]  # a meta from before content hashes: the range is still checked
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="outside the tokenizer's"):
        verify_dataset(data["prefix"], tokenizer)


def test_check_is_cached_until_the_bin_changes(data):
    tokenizer = load_tokenizer(data["tokenizer"])
    first = verify_dataset(data["prefix"], tokenizer)
    assert first["max_token_id"] < tokenizer.vocab_size
    cache = Path(data["prefix"] + CACHE_SUFFIX)
    assert json.loads(cache.read_text())["passed"]
    before = cache.stat().st_mtime_ns
    verify_dataset(data["prefix"], tokenizer)
    assert cache.stat().st_mtime_ns == before  # no second pass over the .bin
    flip_bytes(data["prefix"] + ".bin", range(0, 400, 10))  # ~10% of a small file's bytes
    # A coarse file-system clock may give that write the mtime of the check just before; a later
    # edit (the real case) always moves it.
    stat = os.stat(data["prefix"] + ".bin")
    os.utime(data["prefix"] + ".bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(UserError, match="content hash"):
        verify_dataset(data["prefix"], tokenizer)


def test_prepared_corpus_with_flipped_bytes_is_prepared_again(tmp_path):
    from megatron_grouter.data.default_corpus import prepare_corpus
    from tests.data.small_corpus import many_documents, write_text_directory

    corpus = str(write_text_directory(tmp_path / "corpus", many_documents(10)))
    first = prepare_corpus(corpus, str(tmp_path / "prepared"), vocab_size=300, progress=False)
    intact = Path(f"{first.prefix}.bin").read_bytes()
    flip_bytes(f"{first.prefix}.bin", [5])
    again = prepare_corpus(corpus, str(tmp_path / "prepared"), vocab_size=300, progress=False)
    assert not again.reused and Path(f"{again.prefix}.bin").read_bytes() == intact
