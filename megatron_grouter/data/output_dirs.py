"""Output directories that a failed command does not leave behind.

A refusal (an empty corpus, a bad argument found late) must leave the disk as it found it: the
directories a command created for its output are removed again when it fails, if they are still
empty (a directory that holds anything is kept: something else may own it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def _missing_directories(directory: Path) -> list[Path]:
    """`directory` and its ancestors that do not exist yet, deepest first."""
    missing = []
    directory = Path(os.path.abspath(directory))
    while not directory.exists() and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    return missing


@contextlib.contextmanager
def removed_if_failed(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield `directory`; if the block raises, remove those of it and its parents that the block
    created and left empty."""
    created = _missing_directories(Path(directory))
    try:
        yield Path(directory)
    except BaseException:
        for path in created:
            try:
                path.rmdir()
            except OSError:  # not empty (or already gone): keep it and everything above
                break
        raise
