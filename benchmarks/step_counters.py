"""Counters for one benchmark step: collectives and device→host reads (benchmark instrumentation).

- Collectives: torch.distributed's functions are wrapped (call `wrap_collectives()` before
  megatron_grouter is imported: modules bind aliases at import). A call carrying an integer
  tensor is metadata (counts, split sizes); one carrying floats moves tokens.
- Device→host reads: under `HostReads()`, a TorchFunctionMode follows which tensors derive from
  device data (the `sources`: hidden states, parameters, routing; and every collective's output)
  and counts host reads of those (.cpu, .tolist, .item, .numpy, bool/int/float, nonzero,
  masked_select) — each is a stream sync on CUDA (megatron's alltoall dispatcher batches its
  reads at one sync point per layer, so its reads exceed its syncs). What a read returns is host
  data; host tensors a plan was built from never count.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

COLLECTIVES = ("all_gather_into_tensor", "all_gather_single", "all_gather", "all_reduce", "all_to_all_single",
               "all_to_all", "reduce_scatter_tensor", "broadcast", "barrier")
HOST_READS = {"cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
              "masked_select"}
collective_calls: Counter = Counter()
_active: list["HostReads"] = []


def _tensors(values) -> list[torch.Tensor]:
    return [value for value in tree_flatten(values)[0] if isinstance(value, torch.Tensor)]


def wrap_collectives() -> None:
    for name in COLLECTIVES:
        function = getattr(dist, name, None)
        if function is None or getattr(function, "_counted", False):
            continue

        @functools.wraps(function)
        def wrapper(*args, _function=function, _name=name, **kwargs):
            tensors = _tensors((args, kwargs))
            kind = "tokens" if any(t.is_floating_point() for t in tensors) else "metadata"
            if _name != "barrier":
                collective_calls[kind] += 1
            result = _function(*args, **kwargs)
            for mode in _active:
                mode.taint(tensors)  # outputs are written in place: device data from now on
            return result

        wrapper._counted = True
        setattr(dist, name, wrapper)


class HostReads(TorchFunctionMode):
    def __init__(self, sources: list[torch.Tensor]):
        super().__init__()
        self.device_data: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.reads = 0
        self.taint(sources)

    def taint(self, tensors) -> None:
        for tensor in tensors:
            self.device_data[id(tensor)] = tensor

    def is_device_data(self, tensor: torch.Tensor) -> bool:
        return self.device_data.get(id(tensor)) is tensor

    def __enter__(self):
        _active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active.remove(self)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        derived = any(self.is_device_data(tensor) for tensor in inputs)
        read = derived and getattr(func, "__name__", "") in HOST_READS
        self.reads += read
        result = func(*args, **kwargs)
        if read:  # what a read returns is a host copy (on CPU .cpu() returns the tensor itself)
            for tensor in _tensors(result):
                self.device_data.pop(id(tensor), None)
        elif derived:
            self.taint(_tensors(result))
        return result
