"""A received checkpoint carrying a pickle payload is refused in one line and the payload never runs.

The payload is real: an object whose `__reduce__` makes the unpickler call `exec`, which writes a
marker file. Each test first shows that an ordinary unpickle of the tampered file does run it
(so the test can fail), then runs the real entry point on the checkpoint.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.training.safe_checkpoint_read import read_metadata_safely, verify_checkpoint_safe
from tests.train_runs import MICRO_MODEL, REPO, data_overrides, train_in_process


class Payload:
    """Unpickling this runs `exec(code)`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.fixture(scope="module")
def trained(stdlib_data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("safe_ckpt") / "run"
    train_in_process([*data_overrides(stdlib_data), *MICRO_MODEL, "train.steps=2", "train.warmup_steps=1",
                      "train.save_interval=2", "train.eval_interval=0", "train.eval_iters=1",
                      f"train.out_dir={out}"])
    return stdlib_data, out / "checkpoints" / "step_0000002"


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "received" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    return copy


def _poison_metadata(checkpoint: Path, marker: Path) -> None:
    path = checkpoint / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # our own, just written: trusted
    metadata.planner_data = {"hook": Payload(marker)}
    path.write_bytes(pickle.dumps(metadata))
    pickle.loads(path.read_bytes())  # an unrestricted reader runs the payload ...
    assert marker.read_text() == "pwned"
    marker.unlink()  # ... from here on it must never appear again


def _poison_bytes_item(checkpoint: Path, marker: Path) -> None:
    """Point one `_extra_state` bytes item at a torch.save'd payload appended to its shard."""
    path = checkpoint / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    index, info = next((index, info) for index, info in metadata.storage_data.items()
                       if "_extra_state" in index.fqn)
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    shard = checkpoint / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(buffer.getvalue())
    with open(shard, "ab") as handle:
        handle.write(buffer.getvalue())
    path.write_bytes(pickle.dumps(metadata))
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # what torch's planner does
    assert marker.exists()
    marker.unlink()


def _run(module: str, overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()  # not the in-process run's rendezvous
           if key not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_refused_in_one_line(result: subprocess.CompletedProcess, marker: Path, words: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.stderr[-3000:]  # log lines, then exactly one error line
    assert words in errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists()


def _resume_from(received, data, tmp_path):
    """mg-train resuming from a received checkpoint, as a user would run it."""
    return _run("megatron_grouter.train",
                [*data_overrides(data), *MICRO_MODEL, "train.steps=4", f"train.resume={received}",
                 f"train.out_dir={tmp_path / 'resumed'}"], cwd=tmp_path)


def test_genuine_checkpoint_passes_and_reads_the_same_metadata(trained):
    _, checkpoint = trained
    safe = read_metadata_safely(checkpoint)
    assert safe.state_dict_metadata.keys() == pickle.loads((checkpoint / ".metadata").read_bytes()).state_dict_metadata.keys()
    verify_checkpoint_safe(checkpoint)


def test_payload_in_metadata_is_refused_by_resume(trained, tmp_path):
    data, checkpoint = trained
    received, marker = _copy(checkpoint, tmp_path), tmp_path / "marker"
    _poison_metadata(received, marker)
    with pytest.raises(UserError, match="builtins.exec"):
        verify_checkpoint_safe(received)
    result = _resume_from(received, data, tmp_path)
    _assert_refused_in_one_line(result, marker, "builtins.exec")


def test_payload_in_metadata_is_refused_by_megatron_teacher(trained, tmp_path):
    data, checkpoint = trained
    received, marker = _copy(checkpoint, tmp_path), tmp_path / "marker"
    _poison_metadata(received, marker)
    result = _run("megatron_grouter.offline.distill",
                  ["source.kind=megatron", f"source.path={received}", f"data.prefix={data['prefix']}",
                   "train.steps=1", f"out_dir={tmp_path / 'distill'}"], cwd=tmp_path)
    _assert_refused_in_one_line(result, marker, "builtins.exec")


def test_payload_in_a_bytes_item_of_the_shards_is_refused(trained, tmp_path):
    data, checkpoint = trained
    received, marker = _copy(checkpoint, tmp_path), tmp_path / "marker"
    _poison_bytes_item(received, marker)
    with pytest.raises(UserError, match="_extra_state"):
        verify_checkpoint_safe(received)
    result = _resume_from(received, data, tmp_path)
    _assert_refused_in_one_line(result, marker, "_extra_state")


def test_payload_in_common_pt_is_refused(trained, tmp_path):
    _, checkpoint = trained
    received, marker = _copy(checkpoint, tmp_path), tmp_path / "marker"
    # megatron-core 0.19+ keeps the common state inside the shards but still reads a common.pt it finds
    legacy = received / "common.pt"
    common = torch.load(legacy, weights_only=True) if legacy.is_file() else {}
    common["extra"] = Payload(marker)
    torch.save(common, received / "common.pt")
    with pytest.raises(UserError, match="common.pt"):
        verify_checkpoint_safe(received)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "not_metadata", "other_backend"])
def test_damaged_metadata_is_one_line(trained, tmp_path, damage):
    _, checkpoint = trained
    received = _copy(checkpoint, tmp_path)
    if damage == "truncate":
        data = (received / ".metadata").read_bytes()
        (received / ".metadata").write_bytes(data[: len(data) // 2])
    elif damage == "not_metadata":
        (received / ".metadata").write_bytes(pickle.dumps({"a": [1, 2]}))
    else:
        (received / "metadata.json").write_text('{"sharded_backend": "zarr", "common_backend": "torch"}')
    with pytest.raises(UserError) as error:
        verify_checkpoint_safe(received)
    assert "\n" not in str(error.value)
