"""Tokenizer loading: our BPE by directory or file, Hugging Face-style directories, fingerprints."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from megatron_grouter.data.tokenizer import EOD_TOKEN, load_tokenizer, train_byte_level_bpe
from megatron_grouter.errors import UserError
from tests.data.small_corpus import TEXTS


def save_hf_style_tokenizer(directory, special_tokens: list[str], config: dict | None) -> None:
    """A word-level tokenizer.json plus (optionally) tokenizer_config.json, as a model repo ships them."""
    backend = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<unk>", *special_tokens]))
    directory.mkdir(parents=True)
    backend.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_trained_bpe_has_eod_and_loads_the_same_from_dir_or_file(tmp_path):
    trained = train_byte_level_bpe(TEXTS * 5, vocab_size=320, out_dir=tmp_path / "tok")
    from_dir, from_file = load_tokenizer(tmp_path / "tok"), load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert trained.backend.id_to_token(trained.eod_id) == EOD_TOKEN
    assert trained.fingerprint() == from_dir.fingerprint() == from_file.fingerprint()
    assert trained.vocab_size == len(trained.backend.get_vocab()) <= 320
    text = "Grüße \ufffd 世界"
    assert from_file.encode(text) == trained.encode(text)
    assert trained.decode([*trained.encode("a"), trained.eod_id]) == "a" + EOD_TOKEN


def test_fingerprint_tells_tokenizers_apart(tmp_path):
    first = train_byte_level_bpe(TEXTS * 5, vocab_size=320, out_dir=tmp_path / "a")
    same_vocab_other_merges = train_byte_level_bpe(["zzz yyy xxx www"] * 50, vocab_size=320, out_dir=tmp_path / "b")
    assert first.fingerprint()["sha256"] != same_vocab_other_merges.fingerprint()["sha256"]


@pytest.mark.parametrize("config, expected", [
    ({"eos_token": "</s>"}, "</s>"),
    ({"eos_token": {"content": "<|im_end|>", "special": True}}, "<|im_end|>"),
    (None, "</s>"),  # no config: fall back to a conventional end-of-sequence token
])
def test_hugging_face_directory_eod_token(tmp_path, config, expected):
    save_hf_style_tokenizer(tmp_path / "model", ["<s>", "</s>", "<|im_end|>"], config)
    tokenizer = load_tokenizer(tmp_path / "model")
    assert tokenizer.backend.id_to_token(tokenizer.eod_id) == expected


def test_hugging_face_directory_without_eod_is_refused(tmp_path):
    save_hf_style_tokenizer(tmp_path / "model", ["<pad>"], {"eos_token": "<missing>"})
    with pytest.raises(UserError, match="no end-of-document token"):
        load_tokenizer(tmp_path / "model")


def test_malformed_tokenizer_file_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
