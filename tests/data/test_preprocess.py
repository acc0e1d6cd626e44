"""Corpus → tokenizer → indexed dataset → GPTDataset, with the errors users hit."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grouter.data.corpus import Document, iter_documents, stdlib_files
from megatron_grouter.data.default_corpus import prepare_corpus
from megatron_grouter.data.gpt_datasets import build_gpt_datasets
from megatron_grouter.data.indexed import check_dataset_tokenizer, read_dataset_meta, write_indexed_dataset
from megatron_grouter.data.tokenizer import load_tokenizer, train_byte_level_bpe
from megatron_grouter.errors import UserError
from megatron_grouter.offline.preprocess import main as preprocess_main
from tests.data.small_corpus import TEXTS, many_documents, write_text_directory

REPO = Path(__file__).resolve().parents[2]


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
    written_at = Path(f"{first.prefix}.bin").stat().st_mtime_ns
    second = prepare_corpus("stdlib", str(tmp_path / "small"), vocab_size=300, max_documents=5)
    assert not first.reused and second.reused
    assert Path(f"{second.prefix}.bin").stat().st_mtime_ns == written_at
    assert read_dataset_meta(str(second.prefix))["num_documents"] == 5
    other_parameters = prepare_corpus("stdlib", str(tmp_path / "small"), vocab_size=300, max_documents=6)
    assert not other_parameters.reused and read_dataset_meta(str(other_parameters.prefix))["num_documents"] == 6


def test_prepared_corpus_that_was_damaged_is_prepared_again(tmp_path):
    first = prepare_corpus("stdlib", str(tmp_path / "small"), vocab_size=300, max_documents=3)
    with open(f"{first.prefix}.bin", "r+b") as handle:
        handle.truncate(4)
    again = prepare_corpus("stdlib", str(tmp_path / "small"), vocab_size=300, max_documents=3)
    assert not again.reused
    assert read_dataset_meta(str(again.prefix))["num_documents"] == 3


def test_parallel_workers_write_the_same_dataset_in_order(tokenizer, tmp_path):
    corpus = str(write_text_directory(tmp_path / "corpus", many_documents(23)))
    serial = write_indexed_dataset(iter_documents(corpus), tokenizer, str(tmp_path / "serial"),
                                   batch_size=2, progress=False)
    parallel = write_indexed_dataset(iter_documents(corpus), tokenizer, str(tmp_path / "parallel"),
                                     workers=2, batch_size=2, progress=False)
    assert (serial.num_documents, serial.num_tokens) == (parallel.num_documents, parallel.num_tokens) != (0, 0)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"parallel{suffix}").read_bytes() == (tmp_path / f"serial{suffix}").read_bytes()


def test_failed_write_leaves_no_dataset_behind(tokenizer, tmp_path):
    def documents_then_failure():
        yield Document("a", "first document")
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="went away"):
        write_indexed_dataset(documents_then_failure(), tokenizer, str(tmp_path / "broken"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_index_is_refused(tokenizer, corpus_dir, tmp_path):
    prefix = str(tmp_path / "corpus")
    write_indexed_dataset(iter_documents(str(corpus_dir)), tokenizer, prefix, progress=False)
    Path(prefix + ".idx").write_bytes(b"not an index at all")
    with pytest.raises(UserError, match="idx cannot be read"):
        read_dataset_meta(prefix)


def test_jsonl_text_key_and_bad_records(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "first"}) + "\n\n" + json.dumps({"content": "sécond"}) + "\n")
    documents = list(iter_documents(str(path), text_field="content"))
    assert [(document.name, document.text) for document in documents] == [("docs.jsonl:1", "first"),
                                                                          ("docs.jsonl:3", "sécond")]
    with pytest.raises(UserError, match="docs.jsonl:1 has no 'text' field"):
        list(iter_documents(str(path)))
    path.write_text(json.dumps({"text": 7}) + "\n")
    with pytest.raises(UserError, match="docs.jsonl:1 field .text. is int, not a string"):
        list(iter_documents(str(path)))


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no non-empty documents"):
        list(iter_documents(str(tmp_path / "empty.txt")))


def test_splits_hold_out_whole_documents(tokenizer, tmp_path):
    corpus = str(write_text_directory(tmp_path / "corpus", many_documents(40)))
    prefix = str(tmp_path / "small")
    write_indexed_dataset(iter_documents(corpus), tokenizer, prefix, progress=False)
    train, valid, test = build_gpt_datasets(prefix, tokenizer, seq_length=16, seed=3, split="80,20,0",
                                            num_samples=(50, 10, 0), cache_dir=str(tmp_path / "cache"))
    assert test is None
    train_documents, valid_documents = set(train.indices.tolist()), set(valid.indices.tolist())
    assert train_documents and valid_documents and not train_documents & valid_documents
    assert train_documents | valid_documents == set(range(40))
    sample = valid[0]
    assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["position_ids"].tolist() == list(range(16))


def test_bad_dataset_requests_are_refused(tokenizer, corpus_dir, tmp_path):
    prefix = str(tmp_path / "corpus")
    write_indexed_dataset(iter_documents(str(corpus_dir)), tokenizer, prefix, progress=False)
    for bad in ({"split": "train=all"}, {"seq_length": 0}, {"num_samples": (10, -1, 0)}):
        request = {"split": "90,10,0", "seq_length": 8, "num_samples": (10, 1, 0), **bad}
        with pytest.raises(UserError):
            build_gpt_datasets(prefix, tokenizer, seed=1, cache_dir=str(tmp_path / "cache"), **request)
    other = train_byte_level_bpe(["a different corpus"] * 5, vocab_size=300, out_dir=tmp_path / "other")
    with pytest.raises(UserError, match="another tokenizer"):
        build_gpt_datasets(prefix, other, seq_length=8, seed=1, split="90,10,0", num_samples=(10, 1, 0))


def test_cli_round_trip_and_one_line_errors(corpus_dir, tmp_path, capsys):
    assert preprocess_main(["--input", str(corpus_dir), "--train-tokenizer", "--vocab-size", "320",
                            "--output-prefix", str(tmp_path / "cli" / "c"), "--no-progress"]) == 0
    meta = read_dataset_meta(str(tmp_path / "cli" / "c_text_document"))
    assert meta["num_documents"] == 6 and meta["replaced_chars"] == 2
    check_dataset_tokenizer(str(tmp_path / "cli" / "c_text_document"), load_tokenizer(tmp_path / "cli" / "tokenizer"))
    capsys.readouterr()
    assert preprocess_main(["--input", str(tmp_path / "missing"), "--train-tokenizer",
                            "--output-prefix", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: corpus") and error.count("\n") == 1


def test_tools_script_explains_itself_and_exits_2_on_bad_input(tmp_path):
    script = str(REPO / "tools" / "preprocess_data.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO)
    assert shown.returncode == 0 and "--train-tokenizer" in shown.stdout and "--jsonl-key" in shown.stdout
    bad = subprocess.run([sys.executable, script, "--input", str(tmp_path / "missing"), "--tokenizer",
                          str(tmp_path / "nowhere"), "--output-prefix", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_split_without_documents_is_refused_not_a_hang(stdlib_data, tmp_path):
    small = prepare_corpus("stdlib", str(tmp_path / "c20"), tokenizer=stdlib_data["tokenizer"],
                           max_documents=20, progress=False)
    with pytest.raises(UserError, match="leaves the test split no document"):
        build_gpt_datasets(str(small.prefix), load_tokenizer(stdlib_data["tokenizer"]), seq_length=32,
                           seed=1, split="96,2,2", num_samples=(10, 2, 0))
