"""Helpers for distillation tests: tiny HF teachers on the default corpus's tokenizer, Hydra runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.sources.hf_tiny_checkpoints import tiny_config

SMALL_GROUTER = ["grouter.hidden_size=64", "grouter.num_layers=2", "grouter.num_heads=4",
                 "grouter.window=64"]


def tiny_teacher_on_corpus(model_type: str, out_dir: Path, tokenizer_dir: str, vocab_size: int,
                           router_gain: float = 30.0) -> Path:
    """A random tiny `model_type` MoE over the default corpus's vocabulary, in several shards.

    Transformers' own initialisation (std 0.02) with the routers' weights scaled up: like a trained
    MoE's first layer, routing is decided mostly by the token and partly by its context, and the
    logits are large enough for routing to be decisive.
    """
    config = tiny_config(model_type)
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.shape[0] == 8:
                param.mul_(router_gain)
    model.save_pretrained(out_dir, max_shard_size="200KB")
    shutil.copy(Path(tokenizer_dir) / "tokenizer.json", out_dir / "tokenizer.json")
    return out_dir


def compose_tool(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from megatron_grouter.app import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR / "tool"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)
