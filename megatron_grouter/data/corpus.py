"""Text documents from a corpus: the built-in one (this Python's standard library), a text file,
a directory of text files, or a JSONL file.

Bytes are decoded as UTF-8 with replacement (some stdlib test files are deliberately in other
encodings); the number of replaced characters is counted and reported.
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_grouter.errors import UserError

STDLIB = "stdlib"
THIRD_PARTY_DIRS = {"site-packages", "dist-packages"}
TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".json", ".c", ".h", ".html", ".js", ".ts"}


@dataclass
class Document:
    """One document: its name (relative path, or file:line for JSONL), text, and how many
    characters of it were undecodable bytes replaced by U+FFFD."""

    name: str
    text: str
    replaced_chars: int = 0


def decode(raw: bytes) -> tuple[str, int]:
    """(UTF-8 text of `raw` with undecodable bytes replaced, number of replacement characters added)."""
    text = raw.decode("utf-8", errors="replace")
    # U+FFFD that was already in the file is not a replacement; count only the new ones.
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    return text, max(0, replaced)


def stdlib_files() -> list[Path]:
    """This Python's standard-library .py files (no site-/dist-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        # Prune third-party packages before descending: they outnumber the stdlib several times.
        subdirectories[:] = [name for name in subdirectories if name not in THIRD_PARTY_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files, key=lambda path: str(path.relative_to(root)))


def iter_documents(corpus: str, jsonl_key: str = "text", max_documents: int | None = None) -> Iterator[Document]:
    """Non-empty documents of `corpus` ('stdlib', a text file, a directory of text files, or a
    .jsonl file whose records hold the text under `jsonl_key`) in a deterministic order."""
    if max_documents is not None and max_documents < 1:
        raise UserError(f"max_documents={max_documents}; give a positive number or leave it unset")
    produced = 0
    for document in _documents(corpus, jsonl_key):
        if max_documents is not None and produced >= max_documents:
            return
        if document.text:
            produced += 1
            yield document
    if produced == 0:
        raise UserError(f"corpus {corpus} has no non-empty documents; check the path")


def _documents(corpus: str, jsonl_key: str) -> Iterator[Document]:
    if corpus == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in stdlib_files():
            text, replaced = decode(path.read_bytes())
            yield Document(str(path.relative_to(root)), text, replaced)
        return
    path = Path(corpus)
    if not path.exists():
        raise UserError(f"corpus {corpus} does not exist; give a text file, a directory, a .jsonl file or 'stdlib'")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        for file in files:
            text, replaced = decode(file.read_bytes())
            yield Document(str(file.relative_to(path)), text, replaced)
    elif path.suffix == ".jsonl":
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                line, replaced = decode(raw)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{line_number} is not valid JSON ({error.msg}); "
                                    "fix or drop the line") from None
                if not isinstance(record, dict) or jsonl_key not in record:
                    raise UserError(f"{path}:{line_number} has no {jsonl_key!r} field; set --jsonl-key")
                if not isinstance(record[jsonl_key], str):
                    raise UserError(f"{path}:{line_number} field {jsonl_key!r} is not a string; fix the "
                                    "line or choose another --jsonl-key")
                yield Document(f"{path.name}:{line_number}", record[jsonl_key], replaced)
    else:
        text, replaced = decode(path.read_bytes())
        yield Document(path.name, text, replaced)
