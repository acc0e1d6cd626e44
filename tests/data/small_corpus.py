"""A small, varied text corpus for the data tests: fast to tokenise, hard to round-trip."""

from __future__ import annotations

from pathlib import Path

TEXTS = ["def add(a, b):\n    return a + b\n", "Grüße, 世界 — naïve café ☕", "x = '\ufffd' # replacement",
         "class Foo:\n    pass\n" * 20, "import os\nprint(os.getcwd())\n"]


def many_documents(count: int) -> list[str]:
    """`count` distinct documents of different lengths (so that splits and samples vary)."""
    return [f"# document {index}\n" + TEXTS[index % len(TEXTS)] * (1 + index % 7) for index in range(count)]


def write_text_directory(directory: Path, texts: list[str]) -> Path:
    """One .txt file per text, named so that sorted order is the list order."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(texts):
        (directory / f"doc{index:04d}.txt").write_text(text, encoding="utf-8")
    return directory
