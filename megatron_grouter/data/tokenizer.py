"""Tokenizers: a byte-level BPE trained on the corpus, or any local Hugging Face tokenizer.

`Tokenizer` is the one interface the project uses (encode, decode, vocab_size, eod_id,
fingerprint). The fingerprint (vocab size + sha256 of tokenizer.json) is what datasets, Grouters
and routing caches record, so that data made with one tokenizer is never read with another.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from megatron_grouter.errors import UserError

EOD_TOKEN = "<|endoftext|>"


class Tokenizer:
    def __init__(self, backend: HFTokenizer, path: Path, eod_token: str):
        self.backend = backend
        self.path = path
        eod_id = backend.token_to_id(eod_token)
        if eod_id is None:
            raise UserError(f"tokenizer {path} has no end-of-document token {eod_token!r}")
        self.eod_id = eod_id
        self.eod_token = eod_token

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> dict:
        return {"vocab_size": self.vocab_size,
                "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()}


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE (every string round-trips exactly) and save out_dir/tokenizer.json."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"tokenizer.json.tmp{os.getpid()}"
    backend.save(str(tmp))
    os.replace(tmp, out_dir / "tokenizer.json")
    return load_tokenizer(out_dir)


def _hf_eod_token(directory: Path, backend: HFTokenizer) -> str:
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        token = config.get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        if token and backend.token_to_id(token) is not None:
            return token
    for candidate in (EOD_TOKEN, "</s>", "<|im_end|>", "<eos>"):
        if backend.token_to_id(candidate) is not None:
            return candidate
    raise UserError(f"tokenizer in {directory} has no end-of-document token; add eos_token to its "
                    "tokenizer_config.json")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From a directory holding tokenizer.json (ours or a Hugging Face model's) or the file itself."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no tokenizer.json at {path}; train one with mg-preprocess --train-tokenizer "
                        "or point at a Hugging Face model directory")
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises plain Exceptions for malformed files
        raise UserError(f"{file} is not a valid tokenizer.json ({str(error).splitlines()[0]})") from None
    return Tokenizer(backend, file, _hf_eod_token(file.parent, backend))
