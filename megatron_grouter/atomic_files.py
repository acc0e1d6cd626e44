"""Files written so that a reader sees the old version or the new one, never half of either.

The one way this package replaces a file or a directory: the content goes to a hidden temporary
beside the target (same directory, so the rename stays on one file system), is flushed and
fsynced, is renamed over the target, and the directory holding it is fsynced so the rename itself
survives a crash. If anything fails before the rename, the temporary is removed and the target is
untouched.

  write_bytes_atomic / write_text_atomic / write_json_atomic / save_npz_atomic   content in hand
  atomic_path(target)         a temporary path for writers that want a file name (torch.save,
                              savefig, a tokenizer's save); published when the block ends
  publish_file(tmp, target)   a finished temporary file renamed over `target`
  atomic_directory(target)    a staging directory published as `target` (an old one is replaced
                              only once the new one is complete)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def fsync_directory(path: str | os.PathLike) -> None:
    """Persist a directory's entries (a rename into it); a no-op where directories cannot be
    opened or synced (some network file systems)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _temporary_name(target: Path) -> Path:
    """A hidden, unique name beside `target` that keeps its suffix (writers that pick a format
    from the extension, such as savefig or np.savez, then write the right thing). Files created
    there get the usual umask permissions (mkstemp's would be 0600)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp{target.suffix}")


def publish_file(temporary: str | os.PathLike, target: str | os.PathLike) -> Path:
    """fsync the finished `temporary` file, rename it over `target`, fsync the directory."""
    target = Path(target)
    _fsync_file(temporary)
    os.replace(temporary, target)
    fsync_directory(target.parent)
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; when the block ends without an exception the file
    written there replaces `target`, otherwise it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(target)
    try:
        yield temporary
        publish_file(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        with open(temporary, "xb") as stream:
            stream.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int | None = 2,
                      sort_keys: bool = False, default=None, allow_nan: bool = True) -> Path:
    """`payload` as JSON plus a final newline. The text is built before anything is written, so a
    payload that is not JSON raises without touching `path`."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, default=default, allow_nan=allow_nan)
    return write_text_atomic(path, text + "\n")


def save_npz_atomic(path: str | os.PathLike, meta: dict, **arrays: np.ndarray) -> Path:
    """One .npz with a JSON `meta` entry and `arrays` (no pickle)."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            np.savez(stream, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    return Path(path)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_file(os.path.join(directory, name))
        fsync_directory(directory)


def publish_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make the finished `staging` directory `target` (same parent directory).

    Its files are fsynced first. An existing `target` is renamed aside, the staging directory is
    renamed into place, and only then is the old one removed; if the second rename fails the old
    one is put back. Between the two renames `target` is briefly absent, never half-written.
    """
    staging, target = Path(staging), Path(target)
    _fsync_tree(staging)
    if target.exists():
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(target, retired)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(retired, target)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_directory(target.parent)
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden staging directory beside `target`; published as `target` (see
    publish_directory) when the block ends without an exception, removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary_name(target)
    staging.mkdir()  # (not mkdtemp: the published directory keeps the usual umask permissions)
    try:
        yield staging
        publish_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
