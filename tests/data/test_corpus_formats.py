"""Corpora in the formats they ship in give the same tokens as the same records in a .jsonl;
directories report what they skip; bad files end in one line."""

import bz2
import gzip
import json
import logging
import lzma

import numpy as np
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grouter.data.corpus import iter_documents, resolve_corpus
from megatron_grouter.data.indexed import write_indexed_dataset
from megatron_grouter.data.tokenizer import train_byte_level_bpe
from megatron_grouter.errors import UserError
from megatron_grouter.offline.preprocess import main as preprocess_main
from tests.data.small_corpus import TEXTS, many_documents

RECORDS = [{"text": text, "url": f"https://example.org/{index}", "timestamp": "2019-04-25"}
           for index, text in enumerate(many_documents(12) + ["", "last ☕"])]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_byte_level_bpe(TEXTS * 10, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


def jsonl_bytes(records=RECORDS) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()


def tokens_of(corpus, tokenizer, tmp_path, name, **options) -> list[list[int]]:
    prefix = str(tmp_path / name)
    write_indexed_dataset(iter_documents(corpus, **options), tokenizer, prefix, progress=False)
    dataset = IndexedDataset(prefix)
    return [dataset[index].tolist() for index in range(len(dataset))]


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    (directory / "c4.jsonl").write_bytes(jsonl_bytes())
    return tokens_of(str(directory / "c4.jsonl"), tokenizer, directory, "ref")


def write_compressed(path, how):
    data = jsonl_bytes()
    path.write_bytes({"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
                      "zst": zstandard.ZstdCompressor().compress}[how](data))


@pytest.mark.parametrize("name", ["c4.json.gz", "c4.jsonl.gz", "c4.json", "c4.jsonl.zst", "c4.json.bz2",
                                  "c4.jsonl.xz", "array.json"])
def test_json_lines_compressed_or_not_give_the_jsonl_tokens(name, tokenizer, reference, tmp_path):
    path = tmp_path / name
    if name == "c4.json":
        path.write_bytes(jsonl_bytes())
    elif name == "array.json":
        path.write_text(json.dumps(RECORDS, ensure_ascii=False, indent=1))
    else:
        write_compressed(path, name.rsplit(".", 1)[1])
    tokens = tokens_of(str(path), tokenizer, tmp_path, "out")
    assert tokens == reference and len(tokens) == len(RECORDS) - 1  # the empty record is left out


def test_parquet_gives_the_jsonl_tokens(tokenizer, reference, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"url": [r["url"] for r in RECORDS], "text": [r["text"] for r in RECORDS]})
    pq.write_table(table, tmp_path / "c4.parquet", row_group_size=5)  # several row groups
    assert tokens_of(str(tmp_path / "c4.parquet"), tokenizer, tmp_path, "out") == reference
    # A folder of shards, read in name order, is the same corpus.
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table.slice(0, 6), shards / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(6), shards / "train-00001-of-00002.parquet")
    assert tokens_of(str(shards), tokenizer, tmp_path, "shards") == reference


def test_hf_datasets_directories_give_the_jsonl_tokens(tokenizer, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(RECORDS)
    dataset.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    assert tokens_of(str(tmp_path / "saved"), tokenizer, tmp_path, "saved") == reference
    splits = datasets.DatasetDict({"train": dataset, "validation": dataset.select(range(2))})
    splits.save_to_disk(str(tmp_path / "dict"))
    plan = resolve_corpus(str(tmp_path / "dict"))
    assert [reason for _, reason in plan.skipped] == [
        "another split than 'train' of a DatasetDict (give its directory to read it)"]
    assert tokens_of(plan, tokenizer, tmp_path, "dict") == reference
    # A dataset of another field name, chosen with the text-field option.
    datasets.Dataset.from_dict({"content": [r["text"] for r in RECORDS]}).save_to_disk(str(tmp_path / "content"))
    assert tokens_of(str(tmp_path / "content"), tokenizer, tmp_path, "content", text_field="content") == reference
    with pytest.raises(UserError, match="has no column 'text' \\(columns: content\\)"):
        list(iter_documents(str(tmp_path / "content")))


def test_globs_and_lists_of_files(tokenizer, reference, tmp_path):
    first, second = RECORDS[:5], RECORDS[5:]
    (tmp_path / "c4-00000.json.gz").write_bytes(gzip.compress(jsonl_bytes(first)))
    (tmp_path / "c4-00001.json.gz").write_bytes(gzip.compress(jsonl_bytes(second)))
    assert tokens_of(str(tmp_path / "c4-*.json.gz"), tokenizer, tmp_path, "glob") == reference
    listed = [str(tmp_path / "c4-00000.json.gz"), str(tmp_path / "c4-00001.json.gz")]
    assert tokens_of(listed, tokenizer, tmp_path, "list") == reference
    with pytest.raises(UserError, match="matches no file"):
        resolve_corpus(str(tmp_path / "nothing-*.json"))


def test_directory_reads_every_text_file_and_says_what_it_skipped(tmp_path, caplog):
    corpus = tmp_path / "perl"
    (corpus / "lib" / "Foo").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / "lib" / "Foo" / "Bar.pm").write_text("package Foo::Bar;\nsub new { bless {}, shift }\n1;\n")
    (corpus / "script.pl").write_text("#!/usr/bin/perl\nprint \"hello\\n\";\n")
    (corpus / "Makefile").write_text("all:\n\tperl script.pl\n")
    (corpus / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (corpus / "META.json").write_text('{\n  "name": "Foo-Bar"\n}\n')
    with caplog.at_level(logging.INFO, logger="megatron_grouter"):
        names = [document.name for document in iter_documents(str(corpus))]
    assert names == ["META.json", "Makefile", "lib/Foo/Bar.pm", "script.pl"]
    assert "skipped 2: 1 hidden directories (.git/); 1 binary (logo.png)" in caplog.text
    assert "META.json" in caplog.text and "read as plain text" in caplog.text
    plan = resolve_corpus(str(corpus), suffixes=".pm,.pl")
    assert [source.name for source in plan.sources] == ["lib/Foo/Bar.pm", "script.pl"]
    assert plan.skipped_counts()["not one of the named suffixes .pm,.pl"] == 3


def test_directory_of_only_skipped_files_says_why(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / ".hidden").write_text("x")
    with pytest.raises(UserError, match="no non-empty documents .*2 file\\(s\\) skipped: 1 hidden files "
                                        "\\(.hidden\\); 1 binary \\(a.png\\)"):
        list(iter_documents(str(tmp_path)))


@pytest.mark.parametrize("content, message", [
    (b"\x1f\x8b\x08\x00garbage", "damaged or truncated gzip"),
    (gzip.compress(jsonl_bytes())[:-30], "damaged or truncated gzip"),
    (jsonl_bytes()[:-20], "is not valid JSON"),
])
def test_damaged_files_are_one_line_errors(content, message, tmp_path):
    path = tmp_path / ("c4.json.gz" if content[:2] == b"\x1f\x8b" else "c4.jsonl")
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        list(iter_documents(str(path)))


def test_named_binary_file_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(np.arange(300, dtype=np.int32).tobytes())
    with pytest.raises(UserError, match="looks binary"):
        list(iter_documents(str(tmp_path / "model.bin")))


def test_cli_reads_gzip_with_text_field_and_all_cores(tokenizer, reference, tmp_path, capsys):
    records = [{"content": record["text"]} for record in RECORDS]
    (tmp_path / "c4.json.gz").write_bytes(gzip.compress(jsonl_bytes(records)))
    out = tmp_path / "cli" / "c4"
    assert preprocess_main(["--input", str(tmp_path / "c4.json.gz"), "--text-field", "content",
                            "--tokenizer", str(tokenizer.path), "--output-prefix", str(out),
                            "--no-progress", "--workers", "2"]) == 0
    dataset = IndexedDataset(f"{out}_text_document")
    assert [dataset[index].tolist() for index in range(len(dataset))] == reference
    assert preprocess_main(["--input", str(tmp_path / "c4.json.gz"), "--tokenizer", str(tokenizer.path),
                            "--output-prefix", str(out), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress log lines, if shown
    assert last.startswith("error: ") and "has no 'text' field (fields: content)" in last and "--text-field" in last
