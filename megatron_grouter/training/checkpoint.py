"""Training checkpoints: megatron-core dist_checkpointing, written atomically.

Layout under `<out_dir>/checkpoints/`:
  step_0000100/        a complete checkpoint: model and optimizer (torch_dist, resharding-
                       capable), rng/rank_*.pt, train_state.json (written last)
  step_0000200.tmp/    a checkpoint being written; never read
  latest               the name of the newest complete checkpoint
All ranks write into the `.tmp` directory; after a barrier rank 0 writes train_state.json, renames
the directory and then replaces `latest` (write-then-rename). A job killed at any point leaves
either the previous complete checkpoint or the new one, never a half one that resume trusts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                        optim_state_to_sharding_state)

from megatron_grouter.errors import UserError
from megatron_grouter.training.safe_checkpoint_read import verify_checkpoint_safe

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's moment buffers so a checkpoint can be loaded into them."""
    for param in optimizer_params(optimizer):
        state = optimizer.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_sharded = model.sharded_state_dict()
    optim_state = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sharded, optimizer_params(optimizer))
    optim_state_to_sharding_state(optim_state, id_map, exclude_keys=("step",))
    return {"model": model_sharded, "optimizer": optim_state}


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


def save_checkpoint(root: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, train_state: dict) -> Path:
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_state(model, optimizer), str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        state = dict(train_state, step=step, optimizer_step=step)
        write_text_atomic(tmp / TRAIN_STATE, json.dumps(state, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_text_atomic(root / "latest", final.name + "\n")
    _barrier()
    return final


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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise UserError(f"{path} is not a complete checkpoint (no {TRAIN_STATE}); "
                        "pass another directory to train.resume or use train.resume=auto")
    verify_checkpoint_safe(path)  # before dist_checkpointing unpickles anything in it
    train_state = json.loads((path / TRAIN_STATE).read_text())
    ensure_optimizer_state(optimizer)
    loaded = dist_checkpointing.load(sharded_state(model, optimizer), str(path))
    model.load_state_dict(loaded["model"], strict=True)
    optim_state = loaded["optimizer"]
    step_value = torch.tensor(float(train_state["optimizer_step"]))
    for param_state in optim_state["state"].values():
        param_state["step"] = step_value.clone()
    optimizer.load_state_dict(optim_state)
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return train_state
