"""The routing cache: a frozen Grouter's routing of a whole indexed dataset, stored beside it.

Unit: the token of the indexed dataset (.bin order). Routing is computed in document-aligned
windows (routing/windows.py), so a cached row depends only on the document and position of its
token; any sequence length, split or sample order of GPTDataset reads the same rows. (A cache per
training sample would be invalidated by every change of seq_length or seed.)

Files in the cache directory:
  indices.bin   [tokens, k] uint8 when E ≤ 256, else int16
  weights.bin   [tokens, k] bfloat16 gate weights
  manifest.json format, k, E, window, the Grouter's fingerprint (sha256 of its weights and
                config), the dataset's fingerprint (token and document counts, sha256 of the .idx
                and of the .bin as its meta records it), complete flag
  progress/     chunk completion markers while writing (resumable after a kill)
Size: exactly k·(1 or 2) + k·2 bytes per token plus the manifest.

The manifest names what the rows were computed from, but a label can be edited: opened with the
Grouter it will be used with, a cache is also spot-checked by content (SPOT_CHECK_WINDOWS windows,
sampled by the dataset's fingerprint, routed again and compared with their cached rows).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_grouter.atomic_files import write_json_atomic
from megatron_grouter.errors import UserError

FORMAT = "megatron-grouter/routing-cache"
VERSION = 2  # 2: the dataset fingerprint includes the .bin's sha256
SPOT_CHECK_WINDOWS = 4
# Share of spot-checked tokens whose cached expert set must equal the Grouter's routing (not 1.0:
# a cache written on another device may break a near-tie between two experts the other way).
SPOT_CHECK_AGREEMENT = 0.95


def dataset_fingerprint(prefix: str) -> dict:
    idx_path = Path(prefix + ".idx")
    bin_path = Path(prefix + ".bin")
    if not idx_path.is_file() or not bin_path.is_file():
        raise UserError(f"indexed dataset {prefix}(.bin/.idx) not found; check data.prefix")
    from megatron.core.datasets.indexed_dataset import _IndexReader

    index = _IndexReader(str(idx_path), multimodal=False)
    try:  # recorded by mg-preprocess and verified against the .bin (data/integrity.py)
        bin_sha256 = json.loads(Path(prefix + ".meta.json").read_text()).get("bin_sha256")
    except (OSError, ValueError, AttributeError):
        bin_sha256 = None
    return {"num_tokens": int(bin_path.stat().st_size // index.dtype_size),
            "num_documents": int(len(index.sequence_lengths)),
            "idx_sha256": hashlib.sha256(idx_path.read_bytes()).hexdigest(),
            "bin_sha256": bin_sha256}


def index_dtype(num_experts: int) -> np.dtype:
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.int16)


@dataclass
class RoutingCache:
    directory: Path
    manifest: dict
    indices: np.memmap  # [tokens, k]
    weights_bits: np.memmap  # [tokens, k] uint16 holding bfloat16

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    def rows(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 expert ids and float32 weights for the given global token positions."""
        flat = positions.reshape(-1)
        indices = torch.from_numpy(np.asarray(self.indices[flat], dtype=np.int64))
        bits = torch.from_numpy(np.asarray(self.weights_bits[flat]).astype(np.int16))
        weights = bits.view(torch.bfloat16).float()
        shape = (*positions.shape, self.topk)
        return indices.reshape(shape), weights.reshape(shape)


def open_cache(directory: str | Path, prefix: str, grouter_fingerprint: str | None = None,
               num_experts: int | None = None, topk: int | None = None, grouter=None,
               device: torch.device = torch.device("cpu")) -> RoutingCache:
    """Open a complete cache, refusing (one line) one that does not match its dataset or Grouter.
    With `grouter` (the loaded Grouter it will be used with) its rows are spot-checked too."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"no routing cache at {directory}; write one with mg-predispatch or use "
                        "router.grouter.source=online")
    manifest = _read_manifest(manifest_path)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{directory} is not a version-{VERSION} routing cache; rewrite it with mg-predispatch")
    if not manifest.get("complete"):
        raise UserError(f"routing cache {directory} is incomplete (interrupted); rerun mg-predispatch "
                        "with the same arguments to finish it")
    _check_manifest_fields(manifest_path, manifest)
    if manifest["dataset"] != dataset_fingerprint(prefix):
        raise UserError(f"routing cache {directory} was written for another dataset than {prefix} "
                        "(token counts or .idx hash differ); rerun mg-predispatch for this dataset")
    if grouter_fingerprint is not None and manifest["grouter_fingerprint"] != grouter_fingerprint:
        raise UserError(f"routing cache {directory} was written by another Grouter than the configured "
                        "one; rerun mg-predispatch with router.grouter.path")
    if num_experts is not None and manifest["num_experts"] != num_experts:
        convert = "fold it with mg-fold" if manifest["num_experts"] > num_experts else "expand it with mg-expand"
        raise UserError(f"routing cache {directory} routes to {manifest['num_experts']} experts but the "
                        f"model has {num_experts}; {convert} to {num_experts} experts and predispatch again")
    if topk is not None and manifest["topk"] != topk:
        raise UserError(f"routing cache {directory} holds top-{manifest['topk']} but the model uses "
                        f"top-{topk}; predispatch again with this top-k")
    tokens, k = manifest["dataset"]["num_tokens"], manifest["topk"]
    dtype = index_dtype(manifest["num_experts"])
    expected = {"indices.bin": tokens * k * dtype.itemsize, "weights.bin": tokens * k * 2}
    for name, size in expected.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            raise UserError(f"routing cache file {path} is missing or has the wrong size; rerun mg-predispatch")
    indices = np.memmap(directory / "indices.bin", dtype=dtype, mode="r", shape=(tokens, k))
    weights = np.memmap(directory / "weights.bin", dtype=np.uint16, mode="r", shape=(tokens, k))
    _check_expert_ids(directory, indices, int(manifest["num_experts"]))
    cache = RoutingCache(directory, manifest, indices, weights)
    if grouter is not None:
        spot_check(cache, prefix, grouter, device)
    return cache


def spot_check(cache: RoutingCache, prefix: str, grouter, device: torch.device = torch.device("cpu"),
               windows_to_check: int = SPOT_CHECK_WINDOWS) -> float:
    """Route a few windows (chosen by the dataset fingerprint: the same ones on every rank) with
    `grouter` and compare each token's expert set with the cached one; refuse a cache that holds
    another Grouter's routing whatever its manifest says. Returns the share that agreed."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_grouter.routing.windows import DocumentWindows, route_windows

    window = int(cache.manifest["window"])
    if window != grouter.config.max_seq_length or cache.topk != grouter.config.topk:
        return 1.0  # refused by the callers' own checks, with a better message
    windows = DocumentWindows(IndexedDataset(prefix, mmap=True), window)
    starts, lengths = windows.all_windows()
    if len(starts) == 0:
        return 1.0
    seed = int(cache.manifest["dataset"]["idx_sha256"][:8], 16)
    rows = np.sort(np.random.default_rng(seed).choice(len(starts), min(windows_to_check, len(starts)),
                                                      replace=False))
    with torch.no_grad():
        indices_NWK, _ = route_windows(grouter, windows, starts[rows], lengths[rows], device)
    agreed = total = 0
    for row, (start, length) in enumerate(zip(starts[rows].tolist(), lengths[rows].tolist())):
        routed = np.sort(indices_NWK[row, :length].numpy(), axis=-1)
        cached = np.sort(np.asarray(cache.indices[start:start + length], dtype=np.int64), axis=-1)
        agreed += int(np.all(routed == cached, axis=-1).sum())
        total += length
    share = agreed / max(total, 1)
    if share < SPOT_CHECK_AGREEMENT:
        raise UserError(f"routing cache {cache.directory} does not hold this Grouter's routing: only "
                        f"{agreed} of {total} spot-checked tokens get the same experts (its rows were "
                        "computed by another Grouter or are damaged, whatever its manifest says); rerun "
                        "mg-predispatch with this Grouter")
    return share


MANIFEST_FIELDS = {"topk": int, "num_experts": int, "window": int, "grouter_fingerprint": str, "dataset": dict}
CHECKED_FILE = "checked.json"


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"routing cache manifest {path} is truncated or not JSON; rerun mg-predispatch "
                        "to rewrite the cache") from None
    if not isinstance(manifest, dict):
        raise UserError(f"routing cache manifest {path} is not a JSON object; rerun mg-predispatch")
    return manifest


def _check_manifest_fields(path: Path, manifest: dict) -> None:
    for name, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool):
            raise UserError(f"routing cache manifest {path} has no valid {name!r}; rerun mg-predispatch "
                            "to rewrite the cache")
    if manifest["num_experts"] < 1 or manifest["topk"] < 1:
        raise UserError(f"routing cache manifest {path} says {manifest['num_experts']} experts, top-"
                        f"{manifest['topk']}; rerun mg-predispatch")
    if not {"num_tokens", "num_documents", "idx_sha256"} <= set(manifest["dataset"]):
        raise UserError(f"routing cache manifest {path} has no complete dataset fingerprint; rerun "
                        "mg-predispatch")


def _check_expert_ids(directory: Path, indices: np.memmap, num_experts: int) -> None:
    """Every expert id in [0, num_experts): a damaged cache would otherwise index past the
    expert table inside the MoE layer. One pass over the file, remembered (by its size and
    modification time) in checked.json, so only the first open of a cache pays for it."""
    path = directory / "indices.bin"
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "num_experts": num_experts}
    checked = directory / CHECKED_FILE
    try:
        if json.loads(checked.read_text()) == key:
            return
    except (OSError, json.JSONDecodeError):
        pass
    flat = indices.reshape(-1)
    low, high, bad = 0, -1, 0
    step = 1 << 24
    for begin in range(0, flat.size, step):
        block = np.asarray(flat[begin:begin + step])
        low, high = min(low, int(block.min())), max(high, int(block.max()))
        if high >= num_experts or low < 0:
            bad += int(np.count_nonzero((block >= num_experts) | (block < 0)))
    if bad:
        raise UserError(f"routing cache {directory} holds {bad} expert ids outside 0..{num_experts - 1} "
                        f"(ids {low}..{high}): the cache is damaged; rerun mg-predispatch")
    try:
        _write_json(checked, key)
    except OSError:  # a read-only cache: check again next time
        pass


def write_cache(directory: str | Path, prefix: str, grouter, grouter_fingerprint: str, window: int,
                rank: int = 0, world_size: int = 1, chunk_windows: int = 64,
                device: torch.device = torch.device("cpu"), progress: bool = True,
                barrier=lambda: None) -> dict:
    """Route every window of the dataset into the cache (chunks split over ranks; resumable)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_grouter.routing.windows import DocumentWindows, route_windows

    directory = Path(directory)
    dataset = IndexedDataset(prefix, mmap=True)
    windows = DocumentWindows(dataset, window)
    fingerprint = dataset_fingerprint(prefix)
    num_experts, topk = grouter.config.num_experts, grouter.config.topk
    manifest = {"format": FORMAT, "version": VERSION, "topk": topk, "num_experts": num_experts,
                "window": window, "grouter_fingerprint": grouter_fingerprint, "dataset": fingerprint,
                "index_dtype": index_dtype(num_experts).name, "weight_dtype": "bfloat16",
                "complete": False}
    tokens = fingerprint["num_tokens"]
    progress_dir = directory / "progress"
    if rank == 0:
        existing = directory / "manifest.json"
        previous = json.loads(existing.read_text()) if existing.is_file() else None
        comparable = {key: value for key, value in manifest.items() if key != "complete"}
        if previous is None or {k: v for k, v in previous.items() if k != "complete"} != comparable:
            # A new (or different) cache: start from empty files.
            progress_dir.mkdir(parents=True, exist_ok=True)
            for marker in progress_dir.glob("*"):
                marker.unlink()
            for name, itemsize in (("indices.bin", index_dtype(num_experts).itemsize), ("weights.bin", 2)):
                with open(directory / name, "wb") as handle:
                    handle.truncate(tokens * topk * itemsize)
            _write_json(directory / "manifest.json", manifest)
    barrier()
    indices_out = np.memmap(directory / "indices.bin", dtype=index_dtype(num_experts), mode="r+",
                            shape=(tokens, topk))
    weights_out = np.memmap(directory / "weights.bin", dtype=np.uint16, mode="r+", shape=(tokens, topk))
    starts, lengths = windows.all_windows()
    chunks = [range(begin, min(begin + chunk_windows, len(starts)))
              for begin in range(0, len(starts), chunk_windows)]
    mine = [number for number in range(len(chunks)) if number % world_size == rank]
    todo = [number for number in mine if not (progress_dir / f"{number}.done").exists()]
    bar = _progress_bar(total=int(sum(lengths[chunks[n]].sum() for n in mine)),
                        done=int(sum(lengths[chunks[n]].sum() for n in mine if n not in todo)),
                        enabled=progress and rank == 0)
    started, routed = time.perf_counter(), 0
    for number in todo:
        rows = np.asarray(chunks[number])
        indices_NWK, weights_NWK = route_windows(grouter, windows, starts[rows], lengths[rows], device)
        bits_NWK = weights_NWK.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        for row, (start, length) in enumerate(zip(starts[rows].tolist(), lengths[rows].tolist())):
            indices_out[start:start + length] = indices_NWK[row, :length].numpy()
            weights_out[start:start + length] = bits_NWK[row, :length]
        indices_out.flush()
        weights_out.flush()
        (progress_dir / f"{number}.done").touch()  # only after the rows are on disk
        chunk_tokens = int(lengths[rows].sum())
        routed += chunk_tokens
        bar.update(chunk_tokens)
    bar.close()
    barrier()
    elapsed = time.perf_counter() - started
    if rank == 0:
        missing = [number for number in range(len(chunks)) if not (progress_dir / f"{number}.done").exists()]
        if missing:
            raise UserError(f"routing cache {directory}: {len(missing)} chunks unfinished; rerun mg-predispatch")
        manifest["complete"] = True
        _write_json(directory / "manifest.json", manifest)
    return {"tokens": tokens, "routed_tokens_this_rank": routed, "seconds": elapsed,
            "tokens_per_s": routed / max(elapsed, 1e-9),
            "bytes_per_token": topk * (index_dtype(num_experts).itemsize + 2)}


def _write_json(path: Path, payload: dict) -> None:
    write_json_atomic(path, payload, sort_keys=True)


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="tok", unit_scale=True, disable=not enabled,
                desc="predispatch", mininterval=1.0)
