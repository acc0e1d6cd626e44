"""Build a Hugging Face model cut after one MoE layer, holding only the weights it was given.

The model class is instantiated from a copy of the config with `num_hidden_layers = layer + 1` on
the meta device, so no memory is spent on parameters at construction. The given checkpoint tensors
are then loaded with transformers' own loading step (`convert_and_load_state_dict_in_model`), which
applies the same per-family key renames and expert fusions as `from_pretrained` (e.g. per-expert
`w1`/`w3` tensors -> one fused `gate_up_proj`). Parameters that were not given (the chosen layer's
experts, the final norm, the LM head) stay on the meta device and cost nothing; they are never run.
Non-persistent buffers (rotary `inv_freq`) are not in checkpoints, so the rotary module is rebuilt
for real.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from megatron_grouter.errors import UserError


def truncated_config(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """A copy of `config` describing only the first `num_layers` decoder layers."""
    truncated = copy.deepcopy(config)
    truncated.num_hidden_layers = num_layers
    # Per-layer lists (attention kinds of GPT-OSS / Qwen3-Next, MLP kinds of EXAONE-MoE, Llama-4's
    # no-RoPE layers) must shrink with the layer count or the config refuses to validate.
    for name in list(vars(truncated)):
        value = getattr(truncated, name)
        per_layer = name.endswith("layer_types") or name == "no_rope_layers"
        if per_layer and isinstance(value, list) and len(value) > num_layers:
            setattr(truncated, name, value[:num_layers])
    truncated.use_cache = False
    return truncated


def _load_given_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, model_dir: str
) -> None:
    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=model_dir,
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=get_model_conversion_mapping(model),
    )
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(
            model=model, state_dict=tensors, load_config=load_config
        )
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    problems = []
    if info.unexpected_keys:
        problems.append(f"unexpected {sorted(info.unexpected_keys)[:3]}")
    if info.mismatched_keys:
        problems.append(f"shape mismatch {sorted(info.mismatched_keys)[:3]}")
    if info.conversion_errors:
        problems.append(f"conversion failed {dict(list(info.conversion_errors.items())[:2])}")
    if problems:
        raise UserError(f"checkpoint in {model_dir} does not match its config.json: {'; '.join(problems)}")


def _rebuild_meta_buffers(model: nn.Module, config: PretrainedConfig) -> None:
    """Recreate for real every module whose buffers are still on meta (only rotary embeddings)."""
    for name, module in list(model.named_modules()):
        if not any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise RuntimeError(
                f"buffer of {name} ({type(module).__name__}) was not loaded and cannot be rebuilt"
            )
        parent_name, _, child_name = name.rpartition(".")
        with torch.device("cpu"):
            rebuilt = type(module)(config=config)
        setattr(model.get_submodule(parent_name), child_name, rebuilt)


def _move_real_tensors(model: nn.Module, device: torch.device) -> None:
    """Move loaded parameters and buffers to `device`; meta ones (never run) stay where they are."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and not param.is_meta:
                module._parameters[name] = nn.Parameter(param.detach().to(device), requires_grad=False)
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)


def build_truncated_model(
    config: PretrainedConfig,
    num_layers: int,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    model_dir: str,
) -> nn.Module:
    """The first `num_layers` decoder layers of `config`'s causal LM, loaded from `tensors`, eval mode."""
    truncated = truncated_config(config, num_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(truncated, dtype=dtype)
    _load_given_tensors(model, tensors, dtype, model_dir)
    _rebuild_meta_buffers(model, truncated)
    _move_real_tensors(model, device)
    return model.eval()


def meta_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that hold no data (were not loaded)."""
    return [name for name, param in model.named_parameters() if param.is_meta]
