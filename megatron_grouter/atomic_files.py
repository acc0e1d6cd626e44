"""Files written so that a reader sees the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def save_npz_atomic(path: str | os.PathLike, meta: dict, **arrays: np.ndarray) -> Path:
    """One .npz with a JSON `meta` entry and `arrays` (no pickle): written to a temporary file
    beside `path`, synced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path
