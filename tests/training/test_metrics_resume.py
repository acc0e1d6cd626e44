"""A resumed run continues one record: metrics.jsonl holds each step once, and wandb one run.

A run killed (SIGKILL) after its last checkpoint has logged steps it never saved; the resumed
run trains them again. Its metrics.jsonl must then hold those steps once, with the resumed run's
values, and the records up to the checkpoint untouched. wandb (offline, real) logs every run of
an out_dir into the run whose id the first one saved there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_grouter.training.checkpoint import find_latest
from megatron_grouter.training.loggers import WANDB_ID_FILE, drop_records_from
from tests.train_runs import MICRO_MODEL, REPO, data_overrides, read_metrics, repo_env, train_in_process

STEPS = 12
SAVE_INTERVAL = 4


def overrides(data: dict, out_dir: Path, *extra: str) -> list[str]:
    return [*data_overrides(data), *MICRO_MODEL, f"train.steps={STEPS}", "train.warmup_steps=2",
            "train.eval_interval=0", f"train.save_interval={SAVE_INTERVAL}", "train.log_interval=1",
            f"train.out_dir={out_dir}", *extra]


def logged_steps(out_dir: Path) -> list[int]:
    try:
        return [record["step"] for record in read_metrics(out_dir) if "loss" in record]
    except (FileNotFoundError, ValueError):  # not written yet, or a line half flushed
        return []


def checkpoint_step(out_dir: Path) -> int:
    latest = find_latest(out_dir / "checkpoints")
    return 0 if latest is None else int(latest.name.removeprefix("step_"))


def train_until_killed_past_a_checkpoint(data: dict, out_dir: Path, timeout_s: float = 300) -> None:
    """Run mg-train and SIGKILL it once it has logged a step or two past a checkpoint (steps 5-6
    or 9-10: the next save is then at least a whole step away)."""
    command = [sys.executable, "-m", "megatron_grouter.train", *overrides(data, out_dir)]
    log_path = out_dir.parent / "killed_run.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and process.poll() is None:
            steps = logged_steps(out_dir)
            if steps and steps[-1] > SAVE_INTERVAL and steps[-1] % SAVE_INTERVAL in (1, 2):
                os.killpg(process.pid, signal.SIGKILL)  # the run and any checkpoint writer it forked
                process.wait()
                return
            time.sleep(0.01)
        raise AssertionError(f"the run ended or timed out before it could be killed mid-interval "
                             f"(exit {process.poll()}): {log_path.read_text()[-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_resume_after_a_kill_keeps_one_record_per_step(stdlib_data, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    train_until_killed_past_a_checkpoint(stdlib_data, out_dir)
    saved = checkpoint_step(out_dir)
    killed_lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    killed = {record["step"]: record for record in map(json.loads, killed_lines)}
    assert saved >= SAVE_INTERVAL and max(killed) > saved  # steps logged but never checkpointed

    train_in_process(overrides(stdlib_data, out_dir))

    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    # Up to the checkpoint: the killed run's lines, untouched. After it: the resumed run's records
    # (the resume is exact, so they repeat the killed run's losses).
    assert lines[:saved] == killed_lines[:saved]
    for step in range(saved + 1, max(killed) + 1):
        assert records[step - 1]["loss"] == pytest.approx(killed[step]["loss"], rel=1e-6), step
        assert records[step - 1]["tokens"] == killed[step]["tokens"]


def test_dropping_later_records_rewrites_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    complete = [json.dumps({"step": step, "loss": 10.0 - step}) for step in range(1, 6)]
    path.write_text("\n".join(complete) + '\n{"step": 6, "lo')  # a write cut by a kill
    inode = path.stat().st_ino

    assert drop_records_from(path, first_step=4) == 3  # steps 4, 5 and the torn line
    assert path.read_text() == "\n".join(complete[:3]) + "\n"
    assert path.stat().st_ino != inode  # replaced by a rename, not truncated in place
    assert sorted(item.name for item in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left

    before = path.stat()
    assert drop_records_from(path, first_step=4) == 0  # nothing later: left alone
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert drop_records_from(tmp_path / "absent.jsonl", first_step=1) == 0


def test_a_resumed_run_logs_into_the_same_wandb_run(stdlib_data, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    out_dir = tmp_path / "run"
    common = overrides(stdlib_data, out_dir, "logger.wandb=true", "train.steps=4",
                       "train.save_interval=2")

    train_in_process([*common, "train.max_steps_this_run=2"])
    run_id = (out_dir / WANDB_ID_FILE).read_text().strip()
    summary = train_in_process(common)

    assert summary["step"] == 4
    assert (out_dir / WANDB_ID_FILE).read_text().strip() == run_id
    runs = sorted(path.name for path in (out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs
    assert [record["step"] for record in read_metrics(out_dir)] == [1, 2, 3, 4]


def test_a_damaged_wandb_run_id_is_refused_in_one_line(stdlib_data, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / WANDB_ID_FILE).write_text("../../not an id\n")
    from megatron_grouter.errors import UserError

    with pytest.raises(UserError, match=r"wandb_run_id holds '../../not an id', not a wandb run id"):
        train_in_process(overrides(stdlib_data, out_dir, "logger.wandb=true", "train.steps=1"))
