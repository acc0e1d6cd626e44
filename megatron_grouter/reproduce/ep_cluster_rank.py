"""One rank of the emulated-cluster comparison: mg-train with its collectives timed.

    python -m megatron_grouter.reproduce.ep_cluster_rank <mg-train overrides>

Runs mg-train (megatron_grouter.train.main) unchanged, after wrapping torch.distributed's
collectives so that every call's wall time is recorded (a rank's time inside the call: transfer
plus waiting for its peers), with, for token all-to-alls, the rows this rank sent to each peer.
At exit the record goes to $MG_COLLECTIVE_LOG.rank<RANK>.json for the benchmark to attribute
to steps (ep_cluster_stage.py). Wrapping happens before megatron_grouter is imported, since some
of its modules bind collective aliases at import.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch
import torch.distributed as dist

WRAPPED = ("all_to_all_single", "all_reduce", "all_gather_into_tensor", "all_gather_single", "all_gather",
           "reduce_scatter_tensor", "broadcast", "all_to_all", "barrier")
calls: list[list] = []  # [name, kind, end time (time.time), seconds, rows sent to each group rank or None]


def _kind(args, kwargs) -> str:
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            tensors += [item for item in value if isinstance(item, torch.Tensor)]
    return "tokens" if any(tensor.is_floating_point() for tensor in tensors) else "metadata"


def _rows_sent(name: str, args, kwargs) -> list[int] | None:
    if name != "all_to_all_single":
        return None
    source = args[1] if len(args) > 1 else kwargs["input"]
    splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
    group = kwargs.get("group", args[4] if len(args) > 4 else None)
    size = dist.get_world_size(group)
    rows = list(splits) if splits is not None else [source.shape[0] // size] * size
    width = source[0].numel() * source.element_size() if source.shape[0] else 0
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
    return [ranks, [int(count) for count in rows], int(width)]


def wrap_collectives() -> None:
    for name in WRAPPED:
        function = getattr(dist, name, None)
        if function is None or getattr(function, "_timed", False):
            continue

        @functools.wraps(function)
        def timed(*args, _function=function, _name=name, **kwargs):
            started = time.perf_counter()
            result = _function(*args, **kwargs)
            seconds = time.perf_counter() - started
            calls.append([_name, _kind(args, kwargs), time.time(), seconds, _rows_sent(_name, args, kwargs)])
            return result

        timed._timed = True
        setattr(dist, name, timed)


def write_log() -> None:
    target = os.environ.get("MG_COLLECTIVE_LOG")
    if not target:
        return
    from megatron_grouter.atomic_files import write_json_atomic

    write_json_atomic(f"{target}.rank{os.environ.get('RANK', '0')}.json", {"calls": calls}, indent=None)


def main() -> None:
    wrap_collectives()
    from megatron_grouter import train

    try:
        train.main()
    finally:
        write_log()


if __name__ == "__main__":
    sys.exit(main())
