"""Per-tensor reads from a Hugging Face safetensors checkpoint, with a count of what was read.

A checkpoint is either one `model.safetensors` or several shards listed by
`model.safetensors.index.json` (its `weight_map` says which shard holds each tensor). Reads go
through `safetensors.safe_open`, which maps the file and copies out only the requested tensors, so
tensors that are never asked for are never read. `tensors_read`, `bytes_read` and `keys_read`
record every read, which lets callers (and tests) prove that a partial load stayed partial.

Shards are only opened when one of their tensors is requested, so a shard that holds nothing a
caller needs may be absent from disk (e.g. only the first shards of a huge model were downloaded).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable

import torch
from safetensors import safe_open

from megatron_grouter.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_weight_map(model_dir: str) -> dict[str, str]:
    """Map every tensor name of the checkpoint in `model_dir` to the file (shard) that holds it."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(
                f"{index_path} is not a valid safetensors index ({error}); re-download it"
            ) from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has an empty weight_map; re-download the checkpoint index")
        return {str(name): str(shard) for name, shard in weight_map.items()}

    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single_path):
        with safe_open(single_path, framework="pt") as handle:  # reads the header only
            return dict.fromkeys(handle.keys(), SINGLE_FILE)

    weight_suffixes = (".safetensors", ".bin", ".pt", ".pth")
    others = sorted(name for name in os.listdir(model_dir) if name.endswith(weight_suffixes))
    hint = f" (found {', '.join(others[:3])})" if others else ""
    raise UserError(
        f"no {INDEX_FILE} or {SINGLE_FILE} in {model_dir}{hint}; "
        "save the model with save_pretrained(safe_serialization=True) or download its safetensors files"
    )


class SafetensorsCheckpoint:
    """Lazy, counted access to the tensors of a safetensors checkpoint directory."""

    def __init__(self, model_dir: str):
        if not os.path.isdir(model_dir):
            raise UserError(
                f"checkpoint directory {model_dir} does not exist; pass the folder holding config.json"
            )
        self.model_dir = model_dir
        self.weight_map = _read_weight_map(model_dir)
        self.tensors_read = 0
        self.bytes_read = 0
        self.keys_read: list[str] = []

    def keys(self) -> list[str]:
        """All tensor names in the checkpoint (no tensor data is read)."""
        return list(self.weight_map)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly the named tensors (on CPU), opening each needed shard once."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise UserError(
                    f"tensor {name} is not in the checkpoint at {self.model_dir}; the checkpoint is incomplete"
                )
            by_shard[self.weight_map[name]].append(name)

        tensors: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            shard_path = os.path.join(self.model_dir, shard)
            if not os.path.isfile(shard_path):
                raise UserError(
                    f"shard {shard} listed in {INDEX_FILE} is missing from {self.model_dir}; "
                    "download that file"
                )
            with safe_open(shard_path, framework="pt", device="cpu") as handle:
                for name in shard_names:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor
                    self.tensors_read += 1
                    self.bytes_read += tensor.numel() * tensor.element_size()
                    self.keys_read.append(name)
        return tensors
