"""What differs between the Hugging Face MoE families a teacher can come from.

For each supported `model_type` this records: which decoder layers are MoE (mirroring the layer
construction in transformers' modeling code), where the router sits inside a decoder layer, how the
MoE block is named in checkpoints (Mixtral's files say `block_sparse_moe`, the module says `mlp`),
and how the router turns logits into routing scores (kept as provenance: the teacher always hands
out the raw logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from megatron_grouter.errors import UserError


@dataclass(frozen=True)
class MoEFamily:
    """Family-specific facts about one Hugging Face MoE architecture."""

    model_type: str
    num_experts_attr: str
    is_moe_layer: Callable[[PretrainedConfig, int], bool]
    router_module_path: tuple[str, ...]  # decoder layer -> router module
    checkpoint_block_names: tuple[str, ...]  # names of the MoE block in checkpoint keys
    score_function: str  # how the router scores logits: softmax | sigmoid | topk_softmax

    @property
    def router_name(self) -> str:
        """Name of the router inside the MoE block (same in module tree and checkpoint)."""
        return self.router_module_path[-1]

    def num_experts(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_experts_attr))

    def moe_layers(self, config: PretrainedConfig) -> list[int]:
        """Indices of the decoder layers whose MLP is a routed MoE block."""
        return [index for index in range(config.num_hidden_layers) if self.is_moe_layer(config, index)]


def _every_layer(config: PretrainedConfig, index: int) -> bool:
    return True


def _qwen3_moe_layer(config: PretrainedConfig, index: int) -> bool:
    return (
        index not in (config.mlp_only_layers or [])
        and config.num_experts > 0
        and (index + 1) % config.decoder_sparse_step == 0
    )


def _deepseek_layer(config: PretrainedConfig, index: int) -> bool:
    # transformers builds a MoE block for every layer from first_k_dense_replace on (moe_layer_freq is
    # not consulted there), so the teacher follows the same rule to stay faithful to the modeling code.
    return index >= config.first_k_dense_replace


FAMILIES: dict[str, MoEFamily] = {
    family.model_type: family
    for family in (
        MoEFamily("qwen3_moe", "num_experts", _qwen3_moe_layer, ("mlp", "gate"), ("mlp",), "softmax"),
        MoEFamily("olmoe", "num_experts", _every_layer, ("mlp", "gate"), ("mlp",), "softmax"),
        MoEFamily(
            "mixtral", "num_local_experts", _every_layer, ("mlp", "gate"), ("block_sparse_moe", "mlp"), "softmax"
        ),
        MoEFamily("deepseek_v2", "n_routed_experts", _deepseek_layer, ("mlp", "gate"), ("mlp",), "softmax"),
        MoEFamily("deepseek_v3", "n_routed_experts", _deepseek_layer, ("mlp", "gate"), ("mlp",), "sigmoid"),
        # GPT-OSS takes the top-k of the raw logits (plus router bias) and softmaxes only those.
        MoEFamily("gpt_oss", "num_local_experts", _every_layer, ("mlp", "router"), ("mlp",), "topk_softmax"),
    )
}


def family_for(config: PretrainedConfig, model_dir: str) -> MoEFamily:
    """The MoEFamily of `config`, or UserError naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"model_type {model_type!r} of {model_dir} is not a supported MoE teacher; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
