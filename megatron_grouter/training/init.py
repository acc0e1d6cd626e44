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
# Grouped-GEMM experts: Transformer Engine's TEGroupedMLP holds local expert i as
# `experts.linear_fc{1,2}.weight{i}`; megatron's legacy GroupedMLP all local experts in one
# `experts.weight1` / `experts.weight2`. Both draw expert g's weights as SequentialMLP's
# `experts.local_experts.{g}.linear_fc{1,2}.weight`, so every variant starts from the same experts.
_TE_GROUPED_EXPERT = re.compile(r"\.experts\.linear_fc([12])\.weight(\d+)$")
_LEGACY_GROUPED_EXPERTS = re.compile(r"\.experts\.weight([12])$")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def global_parameter_name(name: str, num_local_experts: int, expert_rank: int,
                          expert_of_slot: list[int] | None = None) -> str:
    """Rename `local_experts.i.` (or TE's grouped `linear_fc{1,2}.weight{i}`) to the expert's
    global index (through expert_of_slot, if given), in SequentialMLP's naming."""
    def global_index(local: int) -> int:
        slot = expert_rank * num_local_experts + local
        return slot if expert_of_slot is None else expert_of_slot[slot]

    grouped = _TE_GROUPED_EXPERT.search(name)
    if grouped:
        return (name[:grouped.start()] + f".experts.local_experts.{global_index(int(grouped.group(2)))}"
                f".linear_fc{grouped.group(1)}.weight")
    return _LOCAL_EXPERT.sub(lambda match: f"local_experts.{global_index(int(match.group(1)))}.", name)


def is_expert_parameter(name: str) -> bool:
    """Routed experts' weights (sharded over the expert-tensor group), not shared experts'."""
    return ("local_experts." in name or _TE_GROUPED_EXPERT.search(name) is not None
            or _LEGACY_GROUPED_EXPERTS.search(name) is not None)


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


def shard_of(full: torch.Tensor, dim: int, shards: int, rank: int, gated: bool) -> torch.Tensor:
    """Rank `rank`'s slice of a column/row-parallel weight. A gated fc1 ([gate; up] rows) is
    split half by half: megatron's rank r holds [gate_r; up_r] and splits its own output in two."""
    if shards == 1:
        return full
    if gated:
        halves = full.chunk(2, dim=dim)
        return torch.cat([half.chunk(shards, dim=dim)[rank] for half in halves], dim=dim)
    return full.chunk(shards, dim=dim)[rank]


def _is_gated_fc1(global_name: str, gated_linear_unit: bool) -> bool:
    return gated_linear_unit and global_name.endswith("linear_fc1.weight")


@torch.no_grad()
def layout_invariant_init(model: torch.nn.Module, seed: int, std: float, num_layers: int,
                          num_experts: int, expert_of_slot: list[int] | None = None) -> None:
    """Re-draw every matrix parameter (norm weights keep megatron's ones). With `expert_of_slot`
    (a placement's permutation) slot s gets the weights of expert expert_of_slot[s].

    Dense (and shared-expert) weights are slices over the tensor-parallel group; routed experts'
    weights slices over the expert-tensor-parallel group, each rank its own part of one full
    expert — never the whole expert drawn again on every rank."""
    expert_parallel = parallel_state.get_expert_model_parallel_world_size()
    expert_rank = parallel_state.get_expert_model_parallel_rank()
    groups = {False: (parallel_state.get_tensor_model_parallel_world_size(),
                      parallel_state.get_tensor_model_parallel_rank()),
              True: (parallel_state.get_expert_tensor_parallel_world_size(),
                     parallel_state.get_expert_tensor_parallel_rank())}
    gated = getattr(getattr(model, "config", None), "gated_linear_unit", False)
    num_local_experts = num_experts // expert_parallel
    output_std = std / math.sqrt(2.0 * num_layers)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        name = name.removeprefix("module.")
        local_name = global_layer_name(name, model)
        shards, rank = groups[is_expert_parameter(name)]
        legacy = _LEGACY_GROUPED_EXPERTS.search(local_name)
        if legacy:
            param.copy_(_legacy_grouped_weight(param, local_name, legacy, num_local_experts, expert_rank,
                                               expert_of_slot, seed, std, output_std, shards, rank, gated))
            continue
        global_name = global_parameter_name(local_name, num_local_experts, expert_rank, expert_of_slot)
        partition_dim = getattr(param, "partition_dim", -1)
        if _TE_GROUPED_EXPERT.search(local_name):  # fc1 splits its rows, fc2 its columns
            partition_dim = 0 if global_name.endswith("linear_fc1.weight") else 1
        elif not (getattr(param, "tensor_model_parallel", False) and partition_dim >= 0):
            shards = 1
        full_shape = list(param.shape)
        if shards > 1:
            full_shape[partition_dim] *= shards
        param_std = output_std if global_name.endswith(_OUTPUT_PROJECTIONS) else std
        full = _full_tensor(tuple(full_shape), param_std, seed, global_name)
        param.copy_(shard_of(full, partition_dim, shards, rank, _is_gated_fc1(global_name, gated))
                    .to(param.dtype))


def _legacy_grouped_weight(param, local_name, match, num_local_experts, expert_rank, expert_of_slot,
                           seed, std, output_std, shards, rank, gated) -> torch.Tensor:
    """GroupedMLP's weight1 [H, L·fc1_out/etp] (weight2 [L·F/etp, H]) is read as [L, H, ·]
    ([L, ·, H]): local expert i's fc1 (fc2), transposed, is its i-th contiguous block."""
    which = match.group(1)
    prefix = local_name[:match.start()]
    blocks = []
    for local in range(num_local_experts):
        global_name = global_parameter_name(f"{prefix}.experts.local_experts.{local}.linear_fc{which}.weight",
                                            num_local_experts, expert_rank, expert_of_slot)
        hidden = param.shape[0] if which == "1" else param.shape[1]
        per_expert = (param.shape[1] if which == "1" else param.shape[0]) // num_local_experts * shards
        shape, dim = ((per_expert, hidden), 0) if which == "1" else ((hidden, per_expert), 1)
        full = _full_tensor(shape, output_std if which == "2" else std, seed, global_name)
        blocks.append(shard_of(full, dim, shards, rank, gated and which == "1").T)
    return torch.stack(blocks).reshape(param.shape).to(param.dtype)
