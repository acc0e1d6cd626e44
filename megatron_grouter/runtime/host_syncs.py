"""Where a training step would make the host wait for the GPU — counted on a machine without one.

On CUDA `torch.cuda.set_sync_debug_mode("error")` finds these. On the CPU nothing waits, but the
calls are the same: `HostSyncCounter` wraps the tensor methods that read a value into host memory
(`item`, `tolist`, `cpu`, `numpy`, `float(t)`, `int(t)`, `bool(t)`) and counts each call by
the code that made it — the innermost frame outside torch itself and our CPU answers (which
stand in for megatron-core's device code on the CPU): ours (megatron_grouter), megatron-core's,
or other. Work on data that is on the host by construction (a batch's token ids
and cached routing before upload, gloo flags) runs inside `host_data()` and is not counted: on a
GPU it involves no device either.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections import Counter
from pathlib import Path

import torch

_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
_HOST_DATA = threading.local()
_TORCH_DIR = str(Path(torch.__file__).parent)
_OURS = str(Path(__file__).resolve().parent.parent)
_TRANSPARENT = (_TORCH_DIR, str(Path(__file__).resolve().parent / "cpu_compat.py"))


@contextlib.contextmanager
def host_data():
    """Mark a region whose tensors are host data (not counted by HostSyncCounter)."""
    depth = getattr(_HOST_DATA, "depth", 0)
    _HOST_DATA.depth = depth + 1
    try:
        yield
    finally:
        _HOST_DATA.depth = depth


def _origin() -> str:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TRANSPARENT):
        frame = frame.f_back
    if frame is None:
        return "other"
    filename = frame.f_code.co_filename
    if filename.startswith(_OURS):
        return f"megatron_grouter:{Path(filename).name}:{frame.f_lineno}"
    if "/megatron/core/" in filename:
        return f"megatron:{filename.split('/megatron/core/')[1]}:{frame.f_lineno}"
    return "other"


class HostSyncCounter:
    """Counts host reads of tensor values while `counting` is true (a context manager patches
    torch.Tensor for its duration). `counts`: origin → calls."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.counting = False
        self._originals: dict[str, object] = {}

    def _wrap(self, name: str, method):
        counter = self

        @functools.wraps(method)
        def wrapper(tensor, *args, **kwargs):
            if counter.counting and not getattr(_HOST_DATA, "depth", 0):
                counter.counts[_origin()] += 1
            return method(tensor, *args, **kwargs)
        return wrapper

    def __enter__(self) -> HostSyncCounter:
        for name in _READS:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._originals[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, method in self._originals.items():
            setattr(torch.Tensor, name, method)
        self._originals.clear()

    def ours(self) -> int:
        return sum(count for origin, count in self.counts.items() if origin.startswith("megatron_grouter"))

    def megatrons(self) -> int:
        return sum(count for origin, count in self.counts.items() if origin.startswith("megatron:"))
