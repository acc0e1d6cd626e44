"""Helpers for the mg-reproduce tests: a micro experiment composed from the real conf/reproduce."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MICRO_SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
               "model.ffn_hidden_size=64", "model.moe_ffn_hidden_size=32", "model.topk=2",
               "train.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=4",
               "train.eval_iters=1", "train.log_interval=2", "train.warmup_steps=1"]


def _list(items: list[str]) -> str:
    return "[" + ",".join(json.dumps(item) for item in items) + "]"


def micro_overrides(out_dir: Path, data: dict, routers: list[str], seeds: list[int],
                    target_steps: int = 4, extra: list[str] = ()) -> list[str]:
    """A whole experiment in a few seconds per stage: 8 → 4 experts (so the fold runs too)."""
    return [
        "experiment=quick", "name=micro", f"out_dir={out_dir}", "launcher=in_process", "threads=1",
        f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
        "first_seed_only=[]", f"seeds={_list([str(seed) for seed in seeds])}",
        "source.overrides=" + _list([*MICRO_SHAPE, "model.num_experts=8", "train.steps=6",
                                     "train.eval_interval=3", "train.save_interval=0"]),
        "distill.overrides=" + _list(["grouter.hidden_size=16", "grouter.num_layers=1", "grouter.num_heads=2",
                                      "grouter.window=32", "train.steps=4", "train.batch_size=4",
                                      "train.eval_interval=2", "train.eval_batches=1", "train.log_interval=2",
                                      "train.warmup_steps=1"]),
        "tune.overrides=" + _list(["max_tokens=512", "eval_tokens=256", "batch_size=2", "check_interval=2",
                                   "progress=false"]),
        "fold.affinity_tokens=512",
        "target.overrides=" + _list([*MICRO_SHAPE, "model.num_experts=4", f"train.steps={target_steps}",
                                     "train.eval_interval=2", "train.save_interval=0"]),
        f"target.routers={_list(routers)}", "target.checkpoint_interval=2", "probe.sequences=2",
        "plan.enabled=true", "plan.ep_size=2", "plan.samples=64",
        *extra,
    ]


def compose_reproduce(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from megatron_grouter.app import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR / "reproduce"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def reproduce_in_process(overrides: list[str]) -> Path:
    from megatron_grouter.reproduce.cli import reproduce

    return reproduce(compose_reproduce(overrides))
