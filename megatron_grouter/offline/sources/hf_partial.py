"""Teacher source: router logits of one MoE layer of a local Hugging Face checkpoint, loaded partially.

Grouter distillation needs the source model only up to its chosen MoE layer's router, so for a
huge source (Qwen3-235B, DeepSeek-V3) we build just the embedding and the decoder layers up to
that router and read just their tensors from the safetensors shards. Later layers, the chosen
layer's experts, the final norm and the LM head are never read nor allocated. The router still
sees exactly what it sees in the full model: the chosen layer's attention and post-attention norm
run as usual, through the Hugging Face modules themselves (rotary embeddings, causal and padding
masks included).

Usage:
    source = HFPartialSource("/models/Qwen3-30B-A3B")            # first MoE layer
    logits_BSE = source.router_logits(input_ids_BS, attention_mask_BS)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from megatron_grouter.errors import UserError
from megatron_grouter.offline.sources.base import TeacherSource, check_token_batch
from megatron_grouter.offline.sources.checkpoint_reader import SafetensorsCheckpoint
from megatron_grouter.offline.sources.hf_checkpoint_keys import needed_checkpoint_keys
from megatron_grouter.offline.sources.hf_families import MoEFamily, family_for, text_part
from megatron_grouter.offline.sources.hf_routing_target import (AUTO_MIN_AGREEMENT, ROUTING_TARGETS,
                                                                 real_selection, routed_logits,
                                                                 topk_agreement)
from megatron_grouter.offline.sources.hf_truncated_model import build_truncated_model, meta_parameter_names
from megatron_grouter.offline.sources.router_capture import run_until_router

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _load_config(model_dir: str) -> PretrainedConfig:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"no config.json in {model_dir}; pass the directory of a Hugging Face checkpoint")
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot read {model_dir}/config.json with this transformers version: {first_line}"
        ) from None


def _describe_layers(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(str(layer) for layer in layers)


def _choose_layer(
    requested: int | None, moe_layers: list[int], config: PretrainedConfig, model_dir: str
) -> int:
    name = os.path.basename(model_dir.rstrip("/")) or model_dir
    if not moe_layers:
        raise UserError(f"{name} has no MoE layer in its config; pick a mixture-of-experts checkpoint")
    if requested is None:
        return moe_layers[0]
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise UserError(f"moe_layer must be an integer layer index or None, got {requested!r}")
    if not 0 <= requested < config.num_hidden_layers:
        raise UserError(
            f"moe_layer {requested} is outside {name}'s {config.num_hidden_layers} layers; "
            f"MoE layers are {_describe_layers(moe_layers)}"
        )
    if requested not in moe_layers:
        raise UserError(
            f"layer {requested} of {name} is dense; MoE layers are {_describe_layers(moe_layers)}"
        )
    return requested


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(
            f"dtype must be a floating torch dtype such as torch.float32 or torch.bfloat16, got {dtype!r}"
        )
    return dtype


class HFPartialSource(TeacherSource):
    """Router logits of one MoE layer of a Hugging Face MoE checkpoint, loading only what that needs.

    Args:
        model_dir: local directory with config.json and safetensors weights (sharded or single file).
        moe_layer: decoder-layer index of the MoE layer to read; None picks the first MoE layer.
        dtype: dtype the weights are loaded in (logits are always returned as float32).
        device: where the partial model runs.
        routing_target: which logits the teacher hands out. raw: the router's raw logits; routed:
            logits whose top-k is the set the model really selects (bias and group limit applied,
            see hf_routing_target); auto: routed when the raw top-k disagrees with the model's own
            selection on more than 1% of a fixed probe batch (measured at construction and
            recorded in `description`, hence in the Grouter's provenance).

    `tensors_read` / `bytes_read` / `keys_read` report what was read from the checkpoint.
    Supported model types: see `hf_families.FAMILIES`.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        moe_layer: int | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        routing_target: str = "auto",
    ):
        if routing_target not in ROUTING_TARGETS:
            raise UserError(f"routing_target={routing_target!r} is unknown; choose {', '.join(ROUTING_TARGETS)}")
        model_dir = os.path.abspath(os.fspath(model_dir))
        if not os.path.isdir(model_dir):
            raise UserError(
                f"teacher model directory {model_dir} does not exist; pass a local checkpoint folder"
            )
        dtype = _check_dtype(dtype)
        self.device = torch.device(device)
        config = _load_config(model_dir)
        quantization = getattr(config, "quantization_config", None)
        if quantization:
            fields = quantization if isinstance(quantization, dict) else vars(quantization)
            method = fields.get("quant_method", "quantized")
            raise UserError(f"{model_dir} holds {method} weights; dequantize the checkpoint to bf16/fp32 first")

        outer_model_type = getattr(config, "model_type", None)
        config, key_prefix = text_part(config)
        family = family_for(config, model_dir)
        moe_layers = family.moe_layers(config)
        self.moe_layer = _choose_layer(moe_layer, moe_layers, config, model_dir)
        self.num_experts = family.num_experts(config)
        self.topk = family.topk(config)
        self.vocab_size = int(config.vocab_size)
        has_tokenizer = any(os.path.isfile(os.path.join(model_dir, name)) for name in _TOKENIZER_FILES)
        self.tokenizer_dir = model_dir if has_tokenizer else None
        self.description: dict[str, Any] = {
            "source": "hf_partial",
            "model_dir": model_dir,
            "model_type": config.model_type,
            "checkpoint_model_type": outer_model_type,
            "architectures": list(getattr(config, "architectures", None) or []),
            "moe_layer": self.moe_layer,
            "moe_layers": moe_layers,
            "num_experts": self.num_experts,
            "topk": self.topk,
            "score_function": family.score_function,
            "dtype": str(dtype).removeprefix("torch."),
        }

        self.checkpoint = SafetensorsCheckpoint(model_dir)
        stored_as = {key.removeprefix(key_prefix): key for key in self.checkpoint.keys()
                     if key.startswith(key_prefix)}
        needed_keys = needed_checkpoint_keys(stored_as, self.moe_layer, family)
        read = self.checkpoint.read([stored_as[key] for key in needed_keys])
        tensors = {key: read[stored_as[key]] for key in needed_keys}
        del read
        self._model = build_truncated_model(
            config, self.moe_layer + 1, tensors, dtype, self.device, model_dir
        )
        del tensors
        self._check_everything_needed_loaded(family)
        self._family = family
        layer_module = self._decoder.layers[self.moe_layer]
        self._router = layer_module.get_submodule(".".join(family.router_module_path))
        self.routing_target = self._choose_routing_target(routing_target)

    @property
    def _decoder(self) -> torch.nn.Module:
        decoder = getattr(self._model, "model", None)  # *ForCausalLM.model (Llama-4's base_model is itself)
        return decoder if decoder is not None else self._model.base_model

    def _choose_routing_target(self, requested: str) -> str:
        """raw or routed; for auto, measured on a fixed probe batch (same on every rank)."""
        self.description["selection"] = self._family.selection
        if self._family.selection == "topk":  # the model selects the top-k of the raw logits
            self.description["routing_target"] = "raw"
            return "raw"
        generator = torch.Generator().manual_seed(0)
        seq = min(64, int(getattr(self._model.config, "max_position_embeddings", 64) or 64))
        probe_BS = torch.randint(0, self.vocab_size, (4, seq), generator=generator)
        logits_TE, indices_TK = self.raw_logits_and_selection(probe_BS)
        agreement = topk_agreement(logits_TE, indices_TK) if indices_TK is not None else 1.0
        chosen = requested
        if requested == "auto":
            chosen = "routed" if agreement < AUTO_MIN_AGREEMENT else "raw"
        self.description.update(routing_target=chosen, routing_target_requested=requested,
                                raw_topk_agreement=round(agreement, 4),
                                routing_target_rule=f"auto: routed when the raw logits' top-k matches the "
                                                    f"model's selection for < {AUTO_MIN_AGREEMENT:.0%} of "
                                                    f"{probe_BS.numel()} random probe tokens")
        return chosen

    @property
    def tensors_read(self) -> int:
        return self.checkpoint.tensors_read

    @property
    def bytes_read(self) -> int:
        return self.checkpoint.bytes_read

    @property
    def keys_read(self) -> list[str]:
        return list(self.checkpoint.keys_read)

    def _check_everything_needed_loaded(self, family: MoEFamily) -> None:
        """Only the chosen layer's non-router MoE parts, the final norm and the head may stay unloaded."""
        block, router = family.router_module_path[0], family.router_name
        router_prefix = f"layers.{self.moe_layer}.{block}.{router}."
        skipped = [f"layers.{self.moe_layer}.{name}." for name in (block, *family.checkpoint_block_names)]
        missing = []
        for name in meta_parameter_names(self._model):
            if ".layers." not in name and ".embed_tokens." not in name:
                continue  # final norm, LM head: after the router
            if any(prefix in name for prefix in skipped) and router_prefix not in name:
                continue  # experts / shared experts of the chosen layer
            missing.append(name)
        if missing:
            raise UserError(
                f"checkpoint in {self.description['model_dir']} lacks tensors for {', '.join(missing[:3])}"
                f"{' and more' if len(missing) > 3 else ''}; re-download the checkpoint"
            )

    @torch.no_grad()
    def router_logits(
        self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw router logits of the chosen MoE layer, float32 [B, S, E] on `device`."""
        check_token_batch(input_ids_BS, attention_mask_BS, self.vocab_size)
        batch, seq = input_ids_BS.shape
        input_ids_BS = input_ids_BS.to(self.device, torch.long)
        if attention_mask_BS is not None:
            attention_mask_BS = attention_mask_BS.to(self.device, torch.long)
        logits_TE, _ = self._run(input_ids_BS, attention_mask_BS)
        if self.routing_target == "routed":
            logits_TE = routed_logits(self._router, logits_TE, self._family.selection)
        return logits_TE.reshape(batch, seq, self.num_experts)

    @torch.no_grad()
    def raw_logits_and_selection(
        self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw logits [T, E] and the expert ids [T, k] the router itself selected (None if it
        returns none, i.e. it selects the top-k of the logits)."""
        return self._run(input_ids_BS.to(self.device, torch.long),
                         None if attention_mask_BS is None else attention_mask_BS.to(self.device, torch.long))

    def _run(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None):
        decoder, outputs = self._decoder, []
        logits_TE = run_until_router(
            self._router,
            lambda: decoder(input_ids=input_ids_BS, attention_mask=attention_mask_BS, use_cache=False),
            logits_index=self._family.logits_output_index, keep_output=outputs,
        )
        return logits_TE, real_selection(outputs[0])
