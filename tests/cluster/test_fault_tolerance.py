"""Crashes do not lose training: torchrun restarts killed ranks from the newest complete checkpoint,
and a process killed in the middle of writing a checkpoint never leaves resume a broken one.

A restart runs the steps after the newest checkpoint again and replaces their metrics records; the
finished run must hold every step once, with the losses of an uninterrupted run of the same job
(resume restores model, optimizer, rng and data position).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron_grouter.training import checkpoint as ckpt
from tests.train_runs import MICRO_MODEL, data_overrides, read_metrics, torchrun

pytestmark = pytest.mark.cluster

RUN_TIMEOUT_S = 300


def launch(nproc: int, max_restarts: int, overrides: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start torchrun in the background; its workers carry a unique marker in their environment."""
    marker = f"MG_FAULT_TEST={uuid.uuid4().hex}"
    name, value = marker.split("=")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "-m", "megatron_grouter.train",
               *overrides]
    # torchrun shares its rendezvous store with the workers' process group by default, and on a
    # restart the new workers then read the dead workers' gloo addresses from it and cannot
    # connect; a fresh store per attempt (hosted by rank 0) avoids that.
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **{name: value})
    process = subprocess.Popen(command, cwd=log_path.parent, env=env, stdout=open(log_path, "w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    return process, marker


def worker_pids(marker: str, rank: int, launcher_pid: int) -> list[int]:
    """Live training workers of one launch with the given global rank: children of the launcher
    whose environment holds the launch's marker (their own helper processes share both)."""
    wanted = {marker.encode(), f"RANK={rank}".encode()}
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            environment = set((proc_dir / "environ").read_bytes().split(b"\0"))
            state, parent = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if wanted <= environment and state not in ("Z", "X") and int(parent) == launcher_pid:
            found.append(int(proc_dir.name))
    return found


def wait_until(condition, timeout_s: float, what: str, process: subprocess.Popen, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if process.poll() is not None:
            raise AssertionError(f"torchrun exited ({process.returncode}) while waiting for {what}")
        time.sleep(poll_s)
    raise TimeoutError(f"timed out waiting for {what}")


def logged_steps(out_dir: Path) -> list[tuple[int, float]]:
    try:
        return [(record["step"], record["loss"]) for record in read_metrics(out_dir) if "loss" in record]
    except (FileNotFoundError, ValueError):
        return []


def resumes(log_path: Path) -> list[int]:
    """The steps the run's restarts resumed from, in order (from the trainer's log lines)."""
    return [int(match) for match in re.findall(r"resumed from \S+ at step (\d+)", log_path.read_text(errors="replace"))]


def reruns(log_path: Path) -> int:
    """How often a restart logged a step that an earlier attempt had reached (progress lines)."""
    steps = [int(step) for step in re.findall(r"\] step (\d+)/\d+ \|", log_path.read_text(errors="replace"))]
    return sum(step <= max(steps[:index]) for index, step in enumerate(steps) if index)


def assert_matches_uninterrupted(out_dir: Path, overrides: list[str], nproc: int, steps: int, tmp_path: Path) -> None:
    """Every step logged once, each loss that of the same job run without interruption."""
    logged = logged_steps(out_dir)
    assert [step for step, _ in logged] == list(range(1, steps + 1))
    straight = tmp_path / "straight"
    torchrun(nproc, [item if not item.startswith("train.out_dir=") else f"train.out_dir={straight}"
                     for item in overrides], timeout=RUN_TIMEOUT_S)
    expected = dict(logged_steps(straight))
    for step, loss in logged:
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-6), f"step {step} after a restart"


def finish(process: subprocess.Popen, log_path: Path) -> None:
    try:
        code = process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert code == 0, log_path.read_text(errors="replace")[-6000:]


def test_torchrun_restarts_a_killed_rank_from_the_latest_checkpoint(stdlib_data, tmp_path: Path) -> None:
    steps, save_interval = 12, 2
    out_dir = tmp_path / "run"
    overrides = [*data_overrides(stdlib_data), *MICRO_MODEL, f"train.steps={steps}", "train.warmup_steps=2",
                 "train.eval_interval=0", f"train.save_interval={save_interval}", "parallel=ep2",
                 f"train.out_dir={out_dir}"]
    process, marker = launch(2, max_restarts=1, overrides=overrides, log_path=tmp_path / "torchrun.log")
    try:
        wait_until(lambda: len(logged_steps(out_dir)) >= 5, RUN_TIMEOUT_S, "step 5", process)
        killed_after = len(logged_steps(out_dir))
        (victim,) = worker_pids(marker, rank=1, launcher_pid=process.pid)
        os.kill(victim, signal.SIGKILL)
    finally:
        finish(process, tmp_path / "torchrun.log")

    (resumed_at,) = resumes(tmp_path / "torchrun.log")  # the restarted workers resumed once
    assert resumed_at % save_interval == 0 and resumed_at <= killed_after
    assert_matches_uninterrupted(out_dir, overrides, 2, steps, tmp_path)
    assert ckpt.find_latest(out_dir / "checkpoints").name == f"step_{steps:07d}"


def test_kill_during_checkpoint_write_never_breaks_resume(stdlib_data, tmp_path: Path) -> None:
    trials, steps = 3, 10
    out_dir = tmp_path / "run"
    checkpoints = out_dir / "checkpoints"
    overrides = [*data_overrides(stdlib_data), *MICRO_MODEL, f"train.steps={steps}", "train.warmup_steps=2",
                 "train.eval_interval=0", "train.save_interval=1", f"train.out_dir={out_dir}"]
    process, marker = launch(1, max_restarts=trials, overrides=overrides, log_path=tmp_path / "torchrun.log")
    rng = random.Random(20261126)
    killed_mid_write = 0
    try:
        killed: set[int] = set()
        seen_writes: set[tuple] = set()  # a killed write's .tmp stays until that step is saved again

        def new_writes() -> set[tuple]:
            found = set()
            for path in checkpoints.glob("step_*.tmp"):
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                found.add((path.name, info.st_ino, info.st_ctime_ns))
            return found - seen_writes

        for _ in range(trials):
            def writing_worker() -> int | None:
                pids = [pid for pid in worker_pids(marker, rank=0, launcher_pid=process.pid) if pid not in killed]
                return pids[0] if pids and new_writes() else None

            victim = wait_until(writing_worker, RUN_TIMEOUT_S, "a checkpoint being written", process,
                                poll_s=0.002)
            time.sleep(rng.uniform(0.0, 0.03))  # a random point inside (or just after) the write
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
            time.sleep(0.05)
            left_behind = new_writes()
            killed_mid_write += bool(left_behind)
            seen_writes |= left_behind
            latest = ckpt.find_latest(checkpoints)
            assert latest is None or ckpt.is_complete(latest)
    finally:
        finish(process, tmp_path / "torchrun.log")

    assert killed_mid_write >= 1, "no kill landed inside a checkpoint write"
    # A write killed at step k leaves step k-1 as the newest checkpoint, so step k runs again.
    assert reruns(tmp_path / "torchrun.log") >= killed_mid_write
    assert_matches_uninterrupted(out_dir, overrides, 1, steps, tmp_path)
    assert ckpt.find_latest(checkpoints).name == f"step_{steps:07d}"
