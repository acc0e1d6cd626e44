"""A rank killed under torchrun: the survivor stops with one line naming the rank that died."""

from __future__ import annotations

import os
import signal

from tests.cluster.test_fault_tolerance import RUN_TIMEOUT_S, launch, logged_steps, wait_until, worker_pids
from tests.train_runs import MICRO_MODEL, data_overrides


def test_survivor_names_the_killed_rank_in_one_line(stdlib_data, tmp_path):
    out_dir = tmp_path / "run"
    log_path = tmp_path / "torchrun.log"
    overrides = [*data_overrides(stdlib_data), *MICRO_MODEL, "train.steps=400", "train.warmup_steps=2",
                 "train.eval_interval=0", "train.save_interval=-1", "train.log_interval=1", "parallel=ep2",
                 f"train.out_dir={out_dir}"]
    process, marker = launch(2, max_restarts=0, overrides=overrides, log_path=log_path)
    try:
        wait_until(lambda: len(logged_steps(out_dir)) >= 2, RUN_TIMEOUT_S, "step 2", process)
        (victim,) = worker_pids(marker, rank=1, launcher_pid=process.pid)
        os.kill(victim, signal.SIGKILL)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log = log_path.read_text(errors="replace")
    assert code != 0
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log[-6000:]
    assert errors[0].startswith(f"error: rank 1 (pid {victim} on "), errors[0]
    assert "died, so rank 0 stops" in errors[0]
    # No gloo traceback from the survivor (torchrun's own summary of the failed job follows it).
    others = [line for line in log.splitlines() if line != errors[0]]
    assert not any("by peer" in line or "[rank0]" in line for line in others), log[-6000:]
