"""Preemption: a warning signal makes training checkpoint at the next step boundary and stop.

Slurm announces the end of a job with a signal (`#SBATCH --signal=B:USR1@120` in
launch/slurm/train.sbatch, SIGTERM on preemption or scancel). `PreemptionWatch` turns SIGTERM and
SIGUSR1 into a flag instead of an immediate death. After every completed step the trainer asks
`should_stop()`: the ranks all-reduce their flags with MAX over the whole world, so they agree
even when only some of them got the signal, and then all save one checkpoint together and leave
the loop. The run ends with summary["preempted"] = True; `exit_status(summary)` maps that to
PREEMPTED_EXIT_STATUS so a wrapper (or Slurm's RequeueExit) can requeue the job, which then
resumes with train.resume=auto.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from megatron_grouter.runtime.host_syncs import host_data

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# EX_TEMPFAIL from sysexits.h: "try again later". Add RequeueExit=75 to slurm.conf to have Slurm
# requeue on it without a trap in the batch script.
PREEMPTED_EXIT_STATUS = 75


class PreemptionWatch:
    """Catch SIGTERM/SIGUSR1 while installed (a context manager); ask `should_stop()` per step."""

    def __init__(self, device: torch.device | str = "cpu", group=None):
        """`group`: a gloo group for the flags (runtime.host_groups.host_twin): then the check
        never waits for the GPU; without one the flags go through `device`."""
        self.device = torch.device("cpu") if group is not None else torch.device(device)
        self.group = group
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        self.install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.uninstall()

    def install(self) -> None:
        """Replace the handlers of PREEMPTION_SIGNALS (only possible in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank when any rank received a preemption signal (a collective call:
        every rank must call it at the same point)."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32,
                            device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        with host_data() if self.device.type == "cpu" else contextlib.nullcontext():  # a gloo flag: host data
            return bool(flag.item())


def exit_status(summary: dict | None) -> int:
    """The process exit status for a finished run: PREEMPTED_EXIT_STATUS when it was preempted."""
    return PREEMPTED_EXIT_STATUS if summary and summary.get("preempted") else 0
