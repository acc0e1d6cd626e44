"""Training checkpoints: megatron-core dist_checkpointing, written atomically.

Layout under `<out_dir>/checkpoints/`:
  step_0000100/        a complete checkpoint: model and megatron optimizer state (torch_dist;
                       the distributed optimizer's reshards over data parallelism),
                       rng/rank_*.pt, train_state.json (written last)
  step_0000200.tmp/    a checkpoint being written; never read
  latest               the name of the newest complete checkpoint
All ranks write into the `.tmp` directory; after a barrier rank 0 writes train_state.json, renames
the directory and then replaces `latest` (write-then-rename). A job killed at any point leaves
either the previous complete checkpoint or the new one, never a half one that resume trusts.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_grouter.atomic_files import publish_directory, write_text_atomic
from megatron_grouter.errors import UserError
from megatron_grouter.training.optimizer_state import prepare_for_load, restore_step_counts
from megatron_grouter.training.resume_compat import check_resume_compatible
from megatron_grouter.training.safe_checkpoint_read import verify_checkpoint_safe

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


CHECKPOINT_FORMAT = 2  # 2: megatron-core optimizer state (1, unversioned: torch AdamW state)
# The distributed optimizer's state in a layout that reshards over data parallelism (and, unlike
# megatron's default, saves and loads with gloo on CPU in megatron-core 0.16.1).
DISTRIBUTED_OPTIMIZER_SHARDING = "dp_reshardable"


def model_sharded_state(model_chunks: list) -> dict:
    """One chunk: its sharded state dict; interleaved chunks: one nested dict per chunk (their
    local parameter names repeat; the ShardedTensor keys inside are global)."""
    if len(model_chunks) == 1:
        return model_chunks[0].sharded_state_dict()
    return {f"chunk{index}": chunk.sharded_state_dict() for index, chunk in enumerate(model_chunks)}


def sharded_state(model_chunks: list, optimizer, is_loading: bool) -> dict:
    model_sharded = model_sharded_state(model_chunks)
    metadata = {"distrib_optim_sharding_type": DISTRIBUTED_OPTIMIZER_SHARDING}
    return {"model": model_sharded,
            "optimizer": optimizer.sharded_state_dict(model_sharded, is_loading=is_loading,
                                                      metadata=metadata)}


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: Path, step: int, model_chunks: list, optimizer, train_state: dict) -> Path:
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    failure = None
    try:
        dist_checkpointing.save(sharded_state(model_chunks, optimizer, is_loading=False), str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    except (OSError, RuntimeError, CheckpointException) as error:  # (megatron's writers wrap an
        failure = error  # OSError in a RuntimeError, torch's in a CheckpointException)
    _raise_if_save_failed(failure, root, tmp, step)
    if _rank() == 0:
        state = dict(train_state, step=step, checkpoint_format=CHECKPOINT_FORMAT)
        try:
            write_text_atomic(tmp / TRAIN_STATE, json.dumps(state, indent=2, sort_keys=True))
            publish_directory(tmp, final)  # an older step_N is removed only once this one is in place
            write_text_atomic(root / "latest", final.name + "\n")
        except OSError as error:
            failure = error
    _raise_if_save_failed(failure, root, tmp, step)
    _barrier()
    return final


def _raise_if_save_failed(failure: BaseException | None, root: Path, tmp: Path, step: int) -> None:
    """Every rank learns whether any rank failed to write its part; then rank 0 removes the
    partial directory (a full disk stays full otherwise) and each failed rank raises one line."""
    failed = failure is not None
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(failed)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        any_failed = bool(flag.item())
    else:
        any_failed = failed
    if not any_failed:
        return
    partial_bytes = _tree_bytes(tmp)
    _barrier()  # every rank measured the partial directory before rank 0 removes it
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise save_failure_error(failure, root, step, partial_bytes)


def save_failure_error(failure: BaseException | None, root: Path, step: int, partial_bytes: int) -> Exception:
    """A UserError for a full disk, naming the file system and the space a checkpoint needs; any
    other failure is raised as it was (a bug, not bad input)."""
    if failure is None:  # another rank failed: it reports why
        return UserError(f"another rank failed while saving step {step}; freed the partial checkpoint "
                         "(see that rank's error)")
    previous = find_latest(root)
    needs = max(_tree_bytes(previous) if previous is not None else 0, partial_bytes)
    if not _is_out_of_space(failure, root, needs):
        return failure
    return UserError(f"no space left on {_mount_point(root)} while saving step {step} (needs ~"
                     f"{max(needs / 2**20, 0.1):.1f} MB); freed the partial checkpoint — free space or "
                     "point train.out_dir at a larger disk, then resume (train.resume=auto)")


def _is_out_of_space(failure: BaseException, root: Path, needs: int) -> bool:
    seen, error = set(), failure
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "[Errno 28]" in str(error) or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    try:  # torch's zip writer reports a short write as "unexpected pos ...", without an errno
        free = shutil.disk_usage(root).free
    except OSError:
        return False
    # Nearly full, or no room for a checkpoint the size of the previous one (the partial one's
    # files may already be gone: torch's writer removes what it could not finish).
    return free < max(needs, 1 << 20)


def _tree_bytes(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def _mount_point(path: Path) -> str:
    path = Path(path).resolve()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return str(path)


def is_complete(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / TRAIN_STATE).is_file()


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = [path for path in root.glob("step_*") if is_complete(path)] if root.is_dir() else []
    return max(complete, key=lambda path: int(_STEP_DIR.match(path.name).group(1)), default=None)


def _load_chunk_states(model_chunks: list, loaded_model: dict) -> None:
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded_model, strict=True)
        return
    for index, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded_model[f"chunk{index}"], strict=True)


def load_checkpoint(path: Path, model_chunks: list, optimizer, expected: dict | None = None) -> dict:
    """Load `path` into the model and optimizer; `expected` (the resuming run's train state) is
    compared with the checkpoint's before megatron reads anything."""
    path = Path(path)
    if not is_complete(path):
        raise UserError(f"{path} is not a complete checkpoint (no {TRAIN_STATE}); "
                        "pass another directory to train.resume or use train.resume=auto")
    train_state = json.loads((path / TRAIN_STATE).read_text())
    check_resume_compatible(path, train_state, expected)
    verify_checkpoint_safe(path)  # before dist_checkpointing unpickles anything in it
    if train_state.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} was written by an older megatron-grouter trainer (torch AdamW "
                        "optimizer state, before megatron-core's optimizer); start a new run "
                        "(train.resume=none or another train.out_dir)")
    with torch.no_grad():
        prepare_for_load(optimizer)
        loaded = dist_checkpointing.load(sharded_state(model_chunks, optimizer, is_loading=True),
                                         str(path))
        _load_chunk_states(model_chunks, loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    restore_step_counts(optimizer, int(train_state["step"]))
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return train_state

