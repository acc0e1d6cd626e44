"""mg-train under torchrun with host reads of tensor values counted per training step (test and
benchmark instrumentation; runtime/host_syncs.py).

  python -m torch.distributed.run --nproc-per-node 2 -m tests.training.sync_counting_train <overrides>

Counts what runs in every step of the loop (Trainer.train_step and the preemption check), not
the flushes at log steps, evaluations or checkpoints. Writes
<train.out_dir>/host_syncs_rank<R>.json: {step: {origin: calls}}.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from megatron_grouter.runtime.host_syncs import HostSyncCounter
from megatron_grouter.training.preemption import PreemptionWatch
from megatron_grouter.training.trainer import Trainer
from tests.train_runs import train_in_process

counter = HostSyncCounter()
per_step: dict[int, dict[str, int]] = {}


def counted(method, step_of):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        before = counter.counts.copy()
        counter.counting = True
        try:
            return method(self, *args, **kwargs)
        finally:
            counter.counting = False
            new = counter.counts - before
            step = per_step.setdefault(step_of(self), {})
            for origin, calls in new.items():
                step[origin] = step.get(origin, 0) + calls
    return wrapper


state = {"step": 0}


def train_step_of(trainer):
    state["step"] = trainer.step + 1
    return state["step"]


Trainer.train_step = counted(Trainer.train_step, train_step_of)
PreemptionWatch.should_stop = counted(PreemptionWatch.should_stop, lambda watch: state["step"])

if __name__ == "__main__":
    overrides = sys.argv[1:]
    with counter:
        train_in_process(overrides)
    out_dir = next(item.split("=", 1)[1] for item in overrides if item.startswith("train.out_dir="))
    path = Path(out_dir) / f"host_syncs_rank{os.environ.get('RANK', '0')}.json"
    path.write_text(json.dumps(per_step, indent=1, sort_keys=True))
