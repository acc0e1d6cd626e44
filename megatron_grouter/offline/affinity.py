"""Expert co-activation affinity of a Grouter on a dataset (paper §3.2, the input of folding).

P ∈ N^{E×E}: P_ij counts the tokens whose top-k holds both i and j; the diagonal P_ii is expert
i's load. With the one-hot selection O ∈ {0,1}^{T×E} of a batch, P = Oᵀ·O, summed over batches
(counts are exact in float64 up to 2^53 per batch, then accumulated as int64). Every window of the
dataset is routed exactly once (document-aligned windows, the unit the Grouter routes), split
round-robin over torch.distributed ranks and summed with one all_reduce.

The matrix is stored as `<path>.npz` (array "affinity") and `<path>.json` (the Grouter's
fingerprint, token count, dataset), so folding can refuse an affinity built for another Grouter.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from megatron_grouter.atomic_files import atomic_path, write_json_atomic
from megatron_grouter.errors import UserError

FORMAT = "megatron-grouter/affinity"


@dataclass
class Affinity:
    matrix: np.ndarray          # int64 [E, E]
    tokens: int
    grouter_fingerprint: str
    tokens_per_s: float = 0.0
    meta: dict[str, Any] | None = None

    @property
    def load(self) -> np.ndarray:
        return np.diag(self.matrix).copy()


def selection_onehot(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """{0,1} float64 [T, E]: which experts each token's top-k selected."""
    onehot_TE = torch.zeros(indices_TK.shape[0], num_experts, dtype=torch.float64,
                            device=indices_TK.device)
    return onehot_TE.scatter_(1, indices_TK, 1.0)


def coactivation_counts(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E, E] co-activation counts of one batch of top-k selections."""
    onehot_TE = selection_onehot(indices_TK, num_experts)
    return (onehot_TE.T @ onehot_TE).round().long().cpu()


def window_row_batches(num_windows: int, batch_size: int, rank: int = 0, world_size: int = 1,
                       max_windows: int | None = None, first_window: int = 0) -> Iterator[np.ndarray]:
    """This rank's rows of each global batch covering windows first..n-1 (at most max_windows of
    them) once (round-robin)."""
    end = num_windows if max_windows is None else min(num_windows, first_window + max_windows)
    for first in range(first_window, end, batch_size):
        rows = np.arange(first, min(first + batch_size, end))
        yield rows[rank::world_size]


@torch.no_grad()
def compute_affinity(grouter, batches, batch_size: int = 32, max_tokens: int | None = None,
                     device: torch.device | str = "cpu", progress: bool = True,
                     grouter_fingerprint: str = "") -> Affinity:
    """Route every window of `batches` (a WindowBatches) and accumulate the co-activation matrix.

    `max_tokens` caps the windows read (at window granularity, counted as window capacity).
    """
    from tqdm import tqdm

    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    num_experts = grouter.config.num_experts
    window = batches.windows.window
    max_windows = None if max_tokens is None else max(1, -(-int(max_tokens) // window))
    grouter = grouter.to(device).eval()
    matrix_EE = torch.zeros(num_experts, num_experts, dtype=torch.int64)
    tokens = torch.zeros(1, dtype=torch.int64)
    row_batches = list(window_row_batches(len(batches), batch_size, rank, world_size, max_windows))
    started = time.perf_counter()
    bar = tqdm(row_batches, desc="affinity", unit="batch", disable=not progress or rank != 0,
               mininterval=2.0)
    for rows in bar:
        if len(rows) == 0:
            continue
        tokens_BW, mask_BW = batches.gather(rows)
        tokens_BW, mask_BW = tokens_BW.to(device), mask_BW.to(device)
        indices_BWK, _ = grouter.route(tokens_BW, mask_BW)
        indices_TK = indices_BWK[mask_BW]
        matrix_EE += coactivation_counts(indices_TK, num_experts)
        tokens += indices_TK.shape[0]
        bar.set_postfix(tok_s=f"{int(tokens) / max(time.perf_counter() - started, 1e-9):.0f}")
    bar.close()
    if dist.is_initialized():
        reduced = torch.cat([matrix_EE.flatten(), tokens]).to(_reduce_device(device))
        dist.all_reduce(reduced)
        reduced = reduced.cpu()
        matrix_EE, tokens = reduced[:-1].view(num_experts, num_experts), reduced[-1:]
    elapsed = max(time.perf_counter() - started, 1e-9)
    return Affinity(matrix=matrix_EE.numpy(), tokens=int(tokens), grouter_fingerprint=grouter_fingerprint,
                    tokens_per_s=int(tokens) / elapsed)


def _reduce_device(device) -> torch.device:
    backend = dist.get_backend()
    return torch.device(device) if backend == "nccl" else torch.device("cpu")


def affinity_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    base = Path(path)
    if base.suffix in (".npz", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def save_affinity(affinity: Affinity, path: str | os.PathLike) -> Path:
    """Write `<path>.npz` and `<path>.json` atomically; returns the .npz path."""
    npz_path, json_path = affinity_paths(path)
    header = {"format": FORMAT, "num_experts": int(affinity.matrix.shape[0]), "tokens": affinity.tokens,
              "grouter_fingerprint": affinity.grouter_fingerprint,
              "tokens_per_s": affinity.tokens_per_s, **(affinity.meta or {})}
    with atomic_path(npz_path) as tmp_npz:
        np.savez(tmp_npz, affinity=affinity.matrix.astype(np.int64))
    write_json_atomic(json_path, header)
    return npz_path


def load_affinity(path: str | os.PathLike, expected_fingerprint: str | None = None) -> Affinity:
    """Read an affinity; refuse one built for another Grouter (fingerprint mismatch)."""
    npz_path, json_path = affinity_paths(path)
    if not npz_path.is_file() or not json_path.is_file():
        raise UserError(f"affinity {npz_path} (+ .json) not found; compute it with mg-affinity first")
    header = json.loads(json_path.read_text())
    if header.get("format") != FORMAT:
        raise UserError(f"{json_path} is not a Grouter affinity file; compute it with mg-affinity")
    with np.load(npz_path) as data:
        matrix = np.asarray(data["affinity"], dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != header["num_experts"]:
        raise UserError(f"affinity {npz_path} has shape {matrix.shape}, not [E, E]; recompute it with mg-affinity")
    fingerprint = str(header.get("grouter_fingerprint", ""))
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise UserError(f"affinity {npz_path} was built for another Grouter (fingerprint {fingerprint[:12]}, "
                        f"this one {expected_fingerprint[:12]}); recompute it with mg-affinity on this Grouter")
    meta = {key: value for key, value in header.items()
            if key not in ("format", "num_experts", "tokens", "grouter_fingerprint", "tokens_per_s")}
    return Affinity(matrix=matrix, tokens=int(header["tokens"]), grouter_fingerprint=fingerprint,
                    tokens_per_s=float(header.get("tokens_per_s", 0.0)), meta=meta)
