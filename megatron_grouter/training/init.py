"""Parameter initialisation that does not depend on the parallel layout.

megatron initialises each rank's shard from that rank's RNG stream, so a 1-process model and
an EP=2 model built with the same seed start from different expert weights. Here every
parameter is drawn from a generator seeded by (seed, its global name), as a full tensor, and
each rank keeps its slice: any layout of the same config starts from the same weights, which
is what makes "expert parallelism does not change the maths" testable.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state

_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def global_parameter_name(name: str, num_local_experts: int, expert_rank: int,
                          expert_of_slot: list[int] | None = None) -> str:
    """Rename `local_experts.i.` to the expert's global index (through expert_of_slot, if given)."""
    def to_global(match: re.Match) -> str:
        slot = expert_rank * num_local_experts + int(match.group(1))
        return f"local_experts.{slot if expert_of_slot is None else expert_of_slot[slot]}."

    return _LOCAL_EXPERT.sub(to_global, name)


_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_layer_name(name: str, model: torch.nn.Module) -> str:
    """A pipeline stage numbers its layers from 0; name each by its place in the whole model.
    The last stage's tied output weight is the embedding (megatron syncs the two)."""
    decoder = getattr(model, "decoder", None)
    match = _LOCAL_LAYER.match(name)
    if match and decoder is not None:
        layer = decoder.layers[int(match.group(1))]
        return f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]
    if name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"
    return name


def _full_tensor(shape: tuple[int, ...], std: float, seed: int, name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def layout_invariant_init(model: torch.nn.Module, seed: int, std: float, num_layers: int,
                          num_experts: int, expert_of_slot: list[int] | None = None) -> None:
    """Re-draw every matrix parameter (norm weights keep megatron's ones). With `expert_of_slot`
    (a placement's permutation) slot s gets the weights of expert expert_of_slot[s]."""
    expert_parallel = parallel_state.get_expert_model_parallel_world_size()
    expert_rank = parallel_state.get_expert_model_parallel_rank()
    tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
    tensor_rank = parallel_state.get_tensor_model_parallel_rank()
    num_local_experts = num_experts // expert_parallel
    output_std = std / math.sqrt(2.0 * num_layers)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        name = name.removeprefix("module.")
        global_name = global_parameter_name(global_layer_name(name, model), num_local_experts,
                                            expert_rank, expert_of_slot)
        full_shape = list(param.shape)
        partition_dim = getattr(param, "partition_dim", -1)
        sharded = getattr(param, "tensor_model_parallel", False) and partition_dim >= 0
        # Experts shard over the expert-tensor group (size 1 here); dense layers over TP.
        is_expert = "local_experts" in name
        shards = 1 if is_expert else tensor_parallel
        if sharded and shards > 1:
            full_shape[partition_dim] *= shards
        param_std = output_std if name.endswith(_OUTPUT_PROJECTIONS) else std
        full = _full_tensor(tuple(full_shape), param_std, seed, global_name)
        if sharded and shards > 1:
            full = full.chunk(shards, dim=partition_dim)[tensor_rank]
        param.copy_(full.to(param.dtype))
