"""Resume: N steps, stop, resume to 2N equals an uninterrupted 2N run; half-written checkpoints are ignored."""

import shutil

from megatron_grouter.training.checkpoint import find_latest
from tests.train_runs import MICRO_MODEL, data_overrides, train_in_process, train_losses


def run(data, out_dir, extra):
    return train_in_process([*data_overrides(data), *MICRO_MODEL, "train.steps=8",
                             "train.warmup_steps=2", "train.eval_interval=4", "train.eval_iters=1",
                             f"train.out_dir={out_dir}", *extra])


def test_resume_reproduces_uninterrupted_run_exactly(stdlib_data, tmp_path):
    run(stdlib_data, tmp_path / "straight", ["train.save_interval=-1"])
    resumed = tmp_path / "resumed"
    run(stdlib_data, resumed, ["train.save_interval=4", "train.max_steps_this_run=4"])
    assert find_latest(resumed / "checkpoints").name == "step_0000004"
    run(stdlib_data, resumed, ["train.save_interval=4"])
    straight_losses, resumed_losses = train_losses(tmp_path / "straight"), train_losses(resumed)
    assert sorted(resumed_losses) == list(range(1, 9))
    assert resumed_losses == straight_losses  # exact, not approximate


def test_interrupted_checkpoint_is_ignored(stdlib_data, tmp_path):
    out = tmp_path / "run"
    run(stdlib_data, out, ["train.save_interval=4", "train.max_steps_this_run=4"])
    root = out / "checkpoints"
    good = root / "step_0000004"
    # A write killed before the rename: a .tmp directory with real shard files.
    shutil.copytree(good, root / "step_0000008.tmp")
    # A directory renamed by hand without its train_state.json, and a dangling pointer.
    shutil.copytree(good, root / "step_0000006")
    (root / "step_0000006" / "train_state.json").unlink()
    (root / "latest").write_text("step_0000007\n")
    assert find_latest(root) == good
    summary = run(stdlib_data, out, ["train.save_interval=-1", "train.max_steps_this_run=1"])
    assert summary["step"] == 5  # resumed from step 4, not 6 or 8
