"""Data faults: a foreign .meta.json, long first JSON-lines records, refusals that leave no empty
directories, and tokenising memory bounded for one huge single-line document."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megatron_grouter.data.chunked_encoding import encode_arrays, text_pieces
from megatron_grouter.data.corpus import iter_documents, resolve_corpus
from megatron_grouter.data.indexed import read_dataset_meta, write_indexed_dataset
from megatron_grouter.data.tokenizer import train_byte_level_bpe
from megatron_grouter.errors import UserError
from megatron_grouter.offline.preprocess import main as preprocess_main
from tests.data.small_corpus import TEXTS, many_documents
from tests.train_runs import REPO, repo_env

WORDS = ["alpha", "beta", "gamma(", "delta;", "x_1", "42", "café", "🧪", "return", "self.value", "  ", "\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_byte_level_bpe(TEXTS * 10, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


def _dataset(tokenizer, directory, texts):
    return write_indexed_dataset(iter(_documents(texts)), tokenizer, str(directory / "data"), progress=False).prefix


def _documents(texts):
    from megatron_grouter.data.corpus import Document

    return [Document(name=f"doc{index}", text=text) for index, text in enumerate(texts)]


def test_meta_of_another_dataset_is_blamed_on_the_metadata(tokenizer, tmp_path):
    mine = _dataset(tokenizer, tmp_path / "a", many_documents(30))
    other = _dataset(tokenizer, tmp_path / "b", many_documents(12))
    shutil.copy(other + ".meta.json", mine + ".meta.json")
    with pytest.raises(UserError) as refused:
        read_dataset_meta(mine)
    message = str(refused.value)
    assert "meta.json belongs to another dataset or tokenizer" in message
    assert "agree with each other" in message and "truncated" not in message


def test_long_first_json_record_is_json_lines_in_a_directory_and_by_name(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    records = [{"text": ("word " * 3000) + str(index), "meta": "x" * 100} for index in range(10)]
    path = directory / "long.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert len(path.read_text().splitlines()[0]) > 8192
    by_name = [document.text for document in iter_documents(str(path))]
    in_directory = [document.text for document in iter_documents(str(directory))]
    assert by_name == in_directory == [record["text"] for record in records]
    assert not resolve_corpus(str(directory)).notes  # not "read as plain text"


def test_refused_preprocess_leaves_no_output_directory(tokenizer, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.txt").write_text("")
    output = tmp_path / "out" / "deeper"
    status = preprocess_main(["--input", str(empty), "--tokenizer", str(tokenizer.path),
                              "--output-prefix", str(output / "corpus"), "--no-progress"])
    assert status == 2
    assert "no non-empty documents" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_long_pieces_encode_to_the_ids_of_the_whole_text(tokenizer):
    rng = random.Random(1)
    text = " ".join(rng.choice(WORDS) for _ in range(40000))
    pieces = list(text_pieces(text, piece_chars=5000))
    assert len(pieces) > 10 and "".join(pieces) == text
    (ids,) = encode_arrays(tokenizer, [text], piece_chars=5000, batch_chars=20000)
    assert ids.dtype == np.int32 and ids.tolist() == tokenizer.encode(text)


PEAK_SCRIPT = """
import random, resource, sys
import numpy as np, torch, tqdm
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron_grouter.data.corpus import Document
from megatron_grouter.data.indexed import write_indexed_dataset
from megatron_grouter.data.tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1])
rng = random.Random(0)
words = ["alpha", "beta", "gamma(", "delta;", "x_1", "42", "café", "return", "self.value"]
document = Document(name="one", text=" ".join(rng.choice(words) for _ in range(int(sys.argv[2]) // 6)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info = write_indexed_dataset([document], tokenizer, sys.argv[3], progress=False)
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(len(document.text.encode()), info.num_tokens, growth * 1024)
"""


def test_one_huge_single_line_document_tokenises_in_bounded_memory(tokenizer, tmp_path):
    size = 3 * 2**20
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tokenizer.path), str(size),
                             str(tmp_path / "huge")], cwd=REPO, env=repo_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text_bytes, tokens, growth = map(int, result.stdout.split())
    assert tokens > text_bytes // 10
    # Whole-text encoding grew the process by ~200x the text (3 MB -> ~600 MB); in pieces the
    # growth is the text, its ids and one bounded batch of pieces in the backend.
    assert growth < 40 * text_bytes, f"peak grew {growth / 2**20:.0f} MB for a {text_bytes / 2**20:.1f} MB document"
