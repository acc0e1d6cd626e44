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
    """Family-specific facts about one Hugging Face MoE architecture.

    `is_moe_layer=None` means: ask the modeling code itself, by building the model on the meta
    device (no memory) and looking for the router in each decoder layer. That is exact for
    families whose dense/MoE pattern depends on several config fields (layer lists, intervals).
    """

    model_type: str
    num_experts_attr: str
    is_moe_layer: Callable[[PretrainedConfig, int], bool] | None
    router_module_path: tuple[str, ...]  # decoder layer -> router module
    checkpoint_block_names: tuple[str, ...]  # names of the MoE block in checkpoint keys
    score_function: str  # how the router scores logits: softmax | sigmoid | topk_softmax | ...
    topk_attr: str = "num_experts_per_tok"
    logits_output_index: int = 0  # where the raw logits sit in the router's output tuple
    # How the model really selects its experts from the logits (see hf_routing_target):
    # topk: the top-k of the raw logits | sigmoid_bias_group: sigmoid + e_score_correction_bias +
    # group limit (DeepSeek-V3) | softmax_group: softmax + group limit (DeepSeek-V2) |
    # softmax_bias: softmax + bias (ERNIE 4.5).
    selection: str = "topk"
    checkpoint_router_names: tuple[str, ...] = ()  # when checkpoints name the router differently

    @property
    def router_name(self) -> str:
        """Name of the router inside the MoE block (module tree; checkpoints too unless overridden)."""
        return self.router_module_path[-1]

    @property
    def router_checkpoint_names(self) -> tuple[str, ...]:
        return self.checkpoint_router_names or (self.router_name,)

    def num_experts(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_experts_attr))

    def topk(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.topk_attr))

    def moe_layers(self, config: PretrainedConfig) -> list[int]:
        """Indices of the decoder layers whose MLP is a routed MoE block."""
        if self.is_moe_layer is None:
            return _layers_with_router(config, self.router_module_path)
        return [index for index in range(config.num_hidden_layers) if self.is_moe_layer(config, index)]


def _layers_with_router(config: PretrainedConfig, router_path: tuple[str, ...]) -> list[int]:
    """The decoder layers in which transformers' modeling code builds a router (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    decoder = getattr(model, "model", model.base_model)
    found = []
    for index, layer in enumerate(decoder.layers):
        try:
            layer.get_submodule(".".join(router_path))
        except AttributeError:
            continue
        found.append(index)
    return found


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


_MLP_GATE = (("mlp", "gate"), ("mlp",))
FAMILIES: dict[str, MoEFamily] = {
    family.model_type: family
    for family in (
        MoEFamily("qwen3_moe", "num_experts", _qwen3_moe_layer, ("mlp", "gate"), ("mlp",), "softmax"),
        MoEFamily("olmoe", "num_experts", _every_layer, ("mlp", "gate"), ("mlp",), "softmax"),
        MoEFamily(
            "mixtral", "num_local_experts", _every_layer, ("mlp", "gate"), ("block_sparse_moe", "mlp"), "softmax"
        ),
        MoEFamily("deepseek_v2", "n_routed_experts", _deepseek_layer, ("mlp", "gate"), ("mlp",), "softmax",
                  selection="softmax_group"),
        MoEFamily("deepseek_v3", "n_routed_experts", _deepseek_layer, ("mlp", "gate"), ("mlp",), "sigmoid",
                  selection="sigmoid_bias_group"),
        # GPT-OSS takes the top-k of the raw logits (plus router bias) and softmaxes only those.
        MoEFamily("gpt_oss", "num_local_experts", _every_layer, ("mlp", "router"), ("mlp",), "topk_softmax"),
        # Qwen1.5-MoE / Qwen2-57B-A14B: shared expert with its own `shared_expert_gate` (not the router).
        MoEFamily("qwen2_moe", "num_experts", None, *_MLP_GATE, "softmax"),
        MoEFamily("qwen3_next", "num_experts", None, *_MLP_GATE, "softmax"),
        MoEFamily("qwen3_5_moe_text", "num_experts", None, *_MLP_GATE, "softmax"),
        MoEFamily("flex_olmo", "num_experts", None, *_MLP_GATE, "softmax"),
        MoEFamily("minimax", "num_local_experts", None, ("mlp", "gate"), ("block_sparse_moe", "mlp"), "softmax"),
        MoEFamily("hunyuan_v1_moe", "num_experts", None, *_MLP_GATE, "softmax", topk_attr="moe_topk"),
        MoEFamily("cohere2_moe", "num_experts", None, *_MLP_GATE, "topk_softmax"),
        MoEFamily("glm4_moe", "n_routed_experts", None, *_MLP_GATE, "sigmoid", selection="sigmoid_bias_group"),
        MoEFamily("dots1", "n_routed_experts", None, *_MLP_GATE, "sigmoid", selection="sigmoid_bias_group"),
        # EXAONE-MoE and ERNIE 4.5 store the router's bias beside it (`mlp.e_score_correction_bias`,
        # `mlp.moe_statics.*`); transformers moves it into the router module when loading.
        MoEFamily("exaone_moe", "num_experts", None, *_MLP_GATE, "sigmoid", selection="sigmoid_bias_group",
                  checkpoint_router_names=("gate", "e_score_correction_bias")),
        MoEFamily("ernie4_5_moe", "moe_num_experts", None, *_MLP_GATE, "softmax", topk_attr="moe_k",
                  selection="softmax_bias", checkpoint_router_names=("gate", "moe_statics")),
        # Llama-4 (text): sigmoid of the top-k logits; its router returns (scores, logits).
        MoEFamily("llama4_text", "num_local_experts", None, ("feed_forward", "router"), ("feed_forward",),
                  "topk_sigmoid", logits_output_index=1),
        MoEFamily("granitemoe", "num_local_experts", None, ("block_sparse_moe", "router"),
                  ("block_sparse_moe",), "topk_softmax"),
        # Its shared MLP sits beside the MoE block (and after the router): not needed either.
        MoEFamily("granitemoeshared", "num_local_experts", None, ("block_sparse_moe", "router"),
                  ("block_sparse_moe", "shared_mlp"), "topk_softmax"),
        MoEFamily("phimoe", "num_local_experts", None, ("mlp", "router"), ("block_sparse_moe", "mlp"),
                  "sparsemixer", checkpoint_router_names=("gate", "router")),
    )
}


# Multimodal checkpoints whose text decoder is a supported family: model_type -> (attribute of the
# text config, prefix of the text decoder's tensors in the checkpoint). Llama-4 Scout/Maverick ship
# as `llama4` with `language_model.model.layers.*`; the vision tower is never read.
MULTIMODAL_WRAPPERS: dict[str, tuple[str, str]] = {"llama4": ("text_config", "language_model.")}


def text_part(config: PretrainedConfig) -> tuple[PretrainedConfig, str]:
    """The text decoder's config and its checkpoint-key prefix ('' for a plain causal LM)."""
    wrapper = MULTIMODAL_WRAPPERS.get(getattr(config, "model_type", None))
    if wrapper is None:
        return config, ""
    attribute, prefix = wrapper
    return getattr(config, attribute), prefix


def family_for(config: PretrainedConfig, model_dir: str) -> MoEFamily:
    """The MoEFamily of `config`, or UserError naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"model_type {model_type!r} of {model_dir} is not a supported MoE teacher; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
