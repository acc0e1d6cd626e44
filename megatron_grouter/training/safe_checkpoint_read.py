"""Check a received megatron / torch distributed checkpoint before anything unpickles it.

Why: torch's `FileSystemReader.read_metadata` runs `pickle.load` on `<dir>/.metadata`, and torch's
`DefaultLoadPlanner.load_bytes` runs `torch.load(weights_only=False)` on every non-tensor item
(`BytesStorageMetadata`, e.g. megatron's `_extra_state`) it reads from the `.distcp` shards. A
pickle can call any importable function, so a checkpoint someone sent us could run code the moment
`dist_checkpointing.load` touches it. megatron-core 0.16.x–0.18.x keep the common (non-sharded)
state in `common.pt`, read with a plain `torch.load` (weights-only by default in torch >= 2.6,
unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set); 0.19.0+ write it as one more bytes item of the
shards ("common_state", and `metadata.json` no longer names a common backend) but still read a
`common.pt` they find.

`verify_checkpoint_safe(path)` reads those same files first, without ever executing code:
  * `.metadata` with an unpickler that only resolves the classes torch's checkpoint metadata is
    made of (`SAFE_METADATA_GLOBALS`) plus torch dtypes; any other global is refused;
  * every bytes item, and `common.pt`, with `torch.load(weights_only=True)`;
  * `metadata.json` must name the torch_dist sharded backend and, where it names one (up to
    0.18.x), the torch common backend: the only ones whose reads are covered here.
It raises UserError (one line) on anything else, so every caller that loads a checkpoint calls it
first: resume (`training.checkpoint.load_checkpoint`) and the megatron teacher source.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from megatron_grouter.errors import UserError

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
MEGATRON_METADATA = "metadata.json"

# Everything a torch 2.x distributed-checkpoint `.metadata` (as written by megatron-core) pickles.
# Each is a plain dataclass, enum, or a lookup by name: calling it can build data, never run code.
SAFE_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.serialization", "_get_layout"),  # str(layout) -> torch.layout, a dict lookup
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
})


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only SAFE_METADATA_GLOBALS and torch dtypes."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UserError(
            f"{self.source} references {module}.{name}, which torch checkpoint metadata never "
            "contains; refusing to load it (it could run code): use a checkpoint from a trusted source"
        )


def read_metadata_safely(checkpoint_dir: str | Path) -> Metadata:
    """The torch distributed-checkpoint Metadata of `checkpoint_dir`, unpickled with the allow-list."""
    path = Path(checkpoint_dir) / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{checkpoint_dir} has no {METADATA_FILE}; it is not a torch_dist checkpoint "
                        "(or it is incomplete)")
    try:
        with open(path, "rb") as handle:
            metadata = _AllowListUnpickler(handle, path).load()
    except UserError:
        raise
    except Exception as error:  # truncated or corrupted pickles raise all sorts of things
        raise UserError(f"{path} is not readable checkpoint metadata ({type(error).__name__}); "
                        "the checkpoint is damaged") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path} holds a {type(metadata).__name__}, not checkpoint Metadata; "
                        "the checkpoint is damaged")
    return metadata


def _load_weights_only(data: io.BytesIO | Path, what: str) -> None:
    try:
        torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        culprit = next((line.strip() for line in reason if "GLOBAL" in line), reason[0] if reason else "")
        raise UserError(f"{what} is not plain tensors and containers ({culprit[:160]}); refusing to "
                        "load it (it could run code): use a checkpoint from a trusted source") from None
    except Exception as error:
        raise UserError(f"{what} cannot be read ({type(error).__name__}); the checkpoint is "
                        "damaged") from None


def _check_bytes_items(checkpoint_dir: Path, metadata: Metadata) -> None:
    """Every non-tensor item torch would unpickle with weights_only=False must be weights-only."""
    bytes_fqns = {fqn for fqn, item in metadata.state_dict_metadata.items()
                  if isinstance(item, BytesStorageMetadata)}
    storage = metadata.storage_data or {}
    for index, info in storage.items():
        if getattr(index, "fqn", None) not in bytes_fqns:
            continue
        what = f"item {index.fqn} of {checkpoint_dir}"
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{what} is stored with transforms {list(info.transform_descriptors)}, "
                            "which this reader does not check; re-save the checkpoint without them")
        shard = (checkpoint_dir / str(info.relative_path)).resolve()
        if shard.parent != checkpoint_dir.resolve() or not shard.is_file():
            raise UserError(f"{what} points at {info.relative_path}, which is not a file of the "
                            "checkpoint; the checkpoint is damaged")
        with open(shard, "rb") as handle:
            handle.seek(int(info.offset))
            data = handle.read(int(info.length))
        _load_weights_only(io.BytesIO(data), what)


def _check_backends(checkpoint_dir: Path) -> None:
    path = checkpoint_dir / MEGATRON_METADATA
    if not path.is_file():
        return  # a plain torch.distributed.checkpoint directory: only .metadata and shards
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not JSON; the checkpoint is damaged") from None
    backends = (config.get("sharded_backend"), config.get("common_backend", "torch")) \
        if isinstance(config, dict) else None
    if backends != ("torch_dist", "torch"):
        raise UserError(f"{path} names backends {backends}; only torch_dist checkpoints (common "
                        "backend torch) can be read safely")


def verify_checkpoint_safe(checkpoint_dir: str | Path) -> Metadata:
    """Refuse (UserError) a checkpoint whose loading would unpickle anything but plain data.

    Returns the safely read Metadata. Cheap: reads `.metadata`, `common.pt` and the few small
    bytes items, never the tensors.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _check_backends(checkpoint_dir)
    metadata = read_metadata_safely(checkpoint_dir)
    _check_bytes_items(checkpoint_dir, metadata)
    common = checkpoint_dir / COMMON_FILE
    if common.is_file():
        _load_weights_only(common, str(common))
    return metadata
