"""Checkpoint faults: a resume into a run of another shape, and a disk that fills during a save."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.training.checkpoint import find_latest, is_complete
from tests.train_runs import MICRO_MODEL, REPO, data_overrides, repo_env, train_in_process

TWO_STEPS = ["train.steps=2", "train.warmup_steps=1", "train.eval_interval=0", "train.save_interval=1"]


def test_resume_into_another_shape_names_the_fields_before_loading(stdlib_data, tmp_path):
    out = tmp_path / "run"
    common = [*data_overrides(stdlib_data), *MICRO_MODEL, *TWO_STEPS, f"train.out_dir={out}"]
    train_in_process([*common, "model.num_experts=4", "train.max_steps_this_run=1"])
    saved = find_latest(out / "checkpoints")
    before = {path.name: path.stat().st_mtime_ns for path in saved.rglob("*")}
    with pytest.raises(UserError) as refused:
        train_in_process([*common, "model.num_experts=8", "model.hidden_size=128", "train.resume=auto"])
    message = str(refused.value)
    assert "model.num_experts 4→8" in message and "model.hidden_size 64→128" in message
    assert "another shape" in message and "\n" not in message
    # Nothing was loaded into or written over the checkpoint; the same shape still resumes.
    assert {path.name: path.stat().st_mtime_ns for path in saved.rglob("*")} == before
    summary = train_in_process([*common, "model.num_experts=4", "train.resume=auto"])
    assert summary["step"] == 2


def _mount_tmpfs(directory, size: str) -> None:
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or mounted.returncode})")


def test_disk_full_during_save_is_one_line_and_frees_the_partial_checkpoint(stdlib_data, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "12m")  # one checkpoint of the micro model is ~7.8 MB: the second does not fit
    try:
        out = disk / "run"
        result = subprocess.run(
            [sys.executable, "-m", "megatron_grouter.train", *data_overrides(stdlib_data), *MICRO_MODEL,
             "model.num_experts=4", *TWO_STEPS, f"train.out_dir={out}"],
            cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert len(errors) == 1
        assert errors[0].startswith(f"error: no space left on {disk} while saving step 2 (needs ~")
        assert "MB); freed the partial checkpoint" in errors[0]
        root = out / "checkpoints"
        assert not (root / "step_0000002.tmp").exists() and not (root / "step_0000002").exists()
        previous = root / "step_0000001"
        assert is_complete(previous) and find_latest(root) == previous
        assert json.loads((previous / "train_state.json").read_text())["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)
