"""Corpus → tokenizer → indexed dataset → GPTDataset, with the errors users hit."""

import json
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grouter.data.corpus import iter_documents, stdlib_files
from megatron_grouter.data.default_corpus import prepare_corpus
from megatron_grouter.data.gpt_datasets import build_gpt_datasets
from megatron_grouter.data.indexed import check_dataset_tokenizer, read_dataset_meta, write_indexed_dataset
from megatron_grouter.data.tokenizer import load_tokenizer, train_byte_level_bpe
from megatron_grouter.errors import UserError

TEXTS = ["def add(a, b):\n    return a + b\n", "Grüße, 世界 — naïve café ☕", "x = '\ufffd' # replacement",
         "class Foo:\n    pass\n" * 20, "import os\nprint(os.getcwd())\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_byte_level_bpe(TEXTS * 10, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def corpus_dir(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    for index, text in enumerate(TEXTS):
        (directory / f"doc{index}.txt").write_text(text, encoding="utf-8")
    (directory / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return directory


@pytest.mark.parametrize("text", TEXTS + ["\x00\x01 control", "emoji 🧪🧬", "   leading spaces", ""])
def test_byte_level_bpe_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_undecodable_bytes_are_replaced_and_counted(corpus_dir):
    documents = {document.name: document for document in iter_documents(str(corpus_dir))}
    assert documents["latin1.txt"].replaced_chars == 2
    assert documents["doc2.txt"].replaced_chars == 0  # a U+FFFD already in the file is not counted


def test_preprocess_round_trip(tokenizer, corpus_dir, tmp_path):
    prefix = str(tmp_path / "out" / "corpus")
    info = write_indexed_dataset(iter_documents(str(corpus_dir)), tokenizer, prefix, progress=False)
    documents = list(iter_documents(str(corpus_dir)))
    dataset = IndexedDataset(prefix)
    assert len(dataset) == info.num_documents == len(documents)
    assert info.num_tokens == sum(len(dataset[i]) for i in range(len(dataset)))
    for index, document in enumerate(documents):
        ids = dataset[index].tolist()
        assert ids[-1] == tokenizer.eod_id
        assert tokenizer.decode(ids[:-1]) == document.text
    meta = check_dataset_tokenizer(prefix, tokenizer)
    assert meta["replaced_chars"] == 2 and meta["num_tokens"] == info.num_tokens


def test_dataset_made_with_another_tokenizer_is_refused(tokenizer, corpus_dir, tmp_path):
    prefix = str(tmp_path / "corpus")
    write_indexed_dataset(iter_documents(str(corpus_dir)), tokenizer, prefix, progress=False)
    other = train_byte_level_bpe(["something else entirely"] * 5, vocab_size=300, out_dir=tmp_path / "other")
    with pytest.raises(UserError, match="another tokenizer"):
        check_dataset_tokenizer(prefix, other)


def test_missing_and_truncated_files_are_refused(tokenizer, corpus_dir, tmp_path):
    prefix = str(tmp_path / "corpus")
    with pytest.raises(UserError, match="not found"):
        read_dataset_meta(prefix)
    write_indexed_dataset(iter_documents(str(corpus_dir)), tokenizer, prefix, progress=False)
    with open(prefix + ".bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(UserError, match="truncated or corrupted"):
        read_dataset_meta(prefix)
    with pytest.raises(UserError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        list(iter_documents(str(path)))


def test_gpt_dataset_samples(stdlib_data):
    tokenizer = load_tokenizer(stdlib_data["tokenizer"])
    train, valid, _ = build_gpt_datasets(stdlib_data["prefix"], tokenizer, seq_length=32, seed=7,
                                         split="96,2,2", num_samples=(100, 20, 0))
    assert len(train) >= 100 and len(valid) >= 20
    sample = train[3]
    assert sample["tokens"].shape == sample["labels"].shape == (32,)
    assert np.array_equal(np.asarray(sample["tokens"][1:]), np.asarray(sample["labels"][:-1]))
    assert int(sample["tokens"].max()) < tokenizer.vocab_size


def test_default_corpus_is_the_stdlib_and_prepared_once(stdlib_data, tmp_path):
    meta = read_dataset_meta(stdlib_data["prefix"])
    assert meta["num_documents"] == sum(1 for path in stdlib_files() if path.stat().st_size > 0)
    assert meta["num_tokens"] > 5_000_000
    first = prepare_corpus("stdlib", str(tmp_path / "small"), vocab_size=300, max_documents=5)
    second = prepare_corpus("stdlib", str(tmp_path / "small"), vocab_size=300, max_documents=5)
    assert not first.reused and second.reused
    assert read_dataset_meta(str(second.prefix))["num_documents"] == 5


def test_cli_round_trip_and_one_line_errors(corpus_dir, tmp_path):
    command = [sys.executable, "-m", "megatron_grouter.offline.preprocess"]
    ok = subprocess.run([*command, "--input", str(corpus_dir), "--train-tokenizer", "--vocab-size", "320",
                         "--output-prefix", str(tmp_path / "cli" / "c"), "--no-progress"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "cli" / "c_text_document.meta.json").read_text())["num_documents"] == 6
    bad = subprocess.run([*command, "--input", str(tmp_path / "missing"), "--train-tokenizer",
                          "--output-prefix", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: corpus") and "Traceback" not in bad.stderr
