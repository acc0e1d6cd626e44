"""Tokenizers: a byte-level BPE trained on the corpus, or any local Hugging Face tokenizer.

`Tokenizer` is the one interface the project uses (encode, decode, vocab_size, eod_id,
fingerprint). The fingerprint (vocab size + sha256 of tokenizer.json) is what datasets, Grouters
and routing caches record, so that data made with one tokenizer is never read with another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from megatron_grouter.atomic_files import atomic_path
from megatron_grouter.errors import UserError

EOD_TOKEN = "<|endoftext|>"


class Tokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from `path` (a tokenizer.json), with its EOD id.

    `sha256` is taken from the very bytes the backend was built from, so the fingerprint always
    describes the vocabulary in use even if the file is replaced afterwards.
    """

    def __init__(self, backend: HFTokenizer, path: Path, eod_token: str, sha256: str):
        self.backend = backend
        self.path = path
        self.sha256 = sha256
        eod_id = backend.token_to_id(eod_token)
        if eod_id is None:
            raise UserError(f"tokenizer {path} has no end-of-document token {eod_token!r}")
        self.eod_id = eod_id
        self.eod_token = eod_token

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added (special) tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (the backend spreads them over its threads)."""
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept, so decode(encode(x)) == x for a byte-level BPE."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> dict:
        """What datasets, Grouters and caches record to refuse data made with another tokenizer."""
        return {"vocab_size": self.vocab_size, "sha256": self.sha256}


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
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        backend.save(str(tmp))
    return load_tokenizer(out_dir)


def _configured_eos_token(config_path: Path) -> str | None:
    if not config_path.is_file():
        return None
    try:
        token = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{config_path} is not a JSON object; repair or remove it") from None
    if isinstance(token, dict):  # AddedToken serialised as {"content": ..., ...}
        token = token.get("content")
    return token if isinstance(token, str) else None


def _hf_eod_token(directory: Path, backend: HFTokenizer) -> str:
    for config_name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _configured_eos_token(directory / config_name)
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
        hint = (" (a Hugging Face directory without tokenizer.json: save it once with "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                if (path / "tokenizer_config.json").is_file() else "")
        raise UserError(f"no tokenizer.json at {path}{hint}; train one with mg-preprocess "
                        "--train-tokenizer or point at a Hugging Face model directory")
    raw = file.read_bytes()
    try:
        backend = HFTokenizer.from_str(raw.decode("utf-8"))
    except Exception as error:  # tokenizers raises plain Exceptions for malformed files
        first_line = (str(error).splitlines() or ["unreadable"])[0]
        raise UserError(f"{file} is not a valid tokenizer.json ({first_line}); re-create or re-download it") from None
    return Tokenizer(backend, file, _hf_eod_token(file.parent, backend), hashlib.sha256(raw).hexdigest())
