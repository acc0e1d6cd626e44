"""Running mg-train from tests: in this process (one rank) or under torchrun (several)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A model small enough that a few hundred steps take well under a minute on one core.
MICRO_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
               "model.ffn_hidden_size=128", "model.num_experts=8", "model.moe_ffn_hidden_size=64",
               "model.topk=2", "train.seq_length=64", "train.micro_batch_size=4",
               "train.global_batch_size=8", "train.log_interval=20"]


def data_overrides(data: dict) -> list[str]:
    return [f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
            f"data.out_dir={data['out_dir']}"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from megatron_grouter.app import CONF_DIR
    from megatron_grouter.training.config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def train_in_process(overrides: list[str]) -> dict:
    from megatron_grouter.train import train

    return train(compose(overrides))


def repo_env(**overrides: str) -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH (children import
    `tests.*` helpers and this clone's megatron_grouter from any directory) and `overrides`."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **overrides)


def torchrun(nproc: int, overrides: list[str], timeout: int = 600, module: str = "megatron_grouter.train",
             check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", module, *overrides]
    result = subprocess.run(command, cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(out_dir) if "loss" in record}


def val_losses(out_dir: Path) -> dict[int, float]:
    return {record["step"]: record["val_loss"] for record in read_metrics(out_dir)
            if "val_loss" in record}
