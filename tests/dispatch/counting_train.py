"""mg-train under torchrun with every torch.distributed collective counted (test instrumentation).

  python -m torch.distributed.run --nproc-per-node 2 -m tests.dispatch.counting_train <overrides>

The collectives are wrapped before megatron_grouter is imported (modules bind aliases such as
all_gather_single at import). Each call is attributed to the training step running it and to
a region: `moe` inside an MoELayer's forward, `plan` inside the dispatch planner (the plans of
a step's micro-batches), `other` elsewhere (gradient reduction, metrics, backward). Writes
<train.out_dir>/collectives_rank<R>.json: {step: {region: {collective: calls}}}.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch.distributed as dist

COLLECTIVES = ("all_gather_into_tensor", "all_gather_single", "all_gather", "all_reduce", "all_to_all_single",
               "all_to_all", "reduce_scatter_tensor", "broadcast", "barrier", "all_gather_object",
               "broadcast_object_list", "gather", "scatter", "reduce")
state = {"step": None, "region": "other"}
calls: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))


def counted(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if state["step"] is not None:
            calls[state["step"]][state["region"]][name] += 1
        return function(*args, **kwargs)
    return wrapper


def in_region(region, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        outer, state["region"] = state["region"], region
        try:
            return function(*args, **kwargs)
        finally:
            state["region"] = outer
    return wrapper


for collective in COLLECTIVES:
    if hasattr(dist, collective):
        setattr(dist, collective, counted(collective, getattr(dist, collective)))

from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402

from megatron_grouter.dispatch.planner import DispatchPlanner  # noqa: E402
from megatron_grouter.training.trainer import Trainer  # noqa: E402
from tests.train_runs import train_in_process  # noqa: E402

MoELayer.forward = in_region("moe", MoELayer.forward)
DispatchPlanner.plans = in_region("plan", DispatchPlanner.plans)
original_step = Trainer.train_step


def train_step(self):
    state["step"] = self.step
    try:
        return original_step(self)
    finally:
        state["step"] = None


Trainer.train_step = train_step

if __name__ == "__main__":
    overrides = sys.argv[1:]
    train_in_process(overrides)
    out_dir = next(item.split("=", 1)[1] for item in overrides if item.startswith("train.out_dir="))
    path = Path(out_dir) / f"collectives_rank{os.environ.get('RANK', '0')}.json"
    path.write_text(json.dumps({step: {region: dict(names) for region, names in regions.items()}
                                for step, regions in calls.items()}))
