"""Routing stability of a learned router (the paper's Fig. 1a), from a run's saved checkpoints.

Each checkpoint of the run is loaded into megatron-core's GPTModel (built from the run's own
config in train_state.json) and routes one fixed probe batch; every MoE layer's routing map
(the top-k expert set of each token, as the router chose it, expert bias included) is recorded.
Stability between consecutive checkpoints = the share of probe tokens whose exact top-k set is
unchanged, per layer. A fixed (Grouter) router is 1.0 by construction, so only learned routers
are probed.

    python -m megatron_grouter.reproduce.stability --run RUN_DIR --prefix DATA_PREFIX --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from megatron_grouter.errors import UserError

log = logging.getLogger("megatron_grouter")


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    from megatron_grouter.training.checkpoint import is_complete

    root = Path(run_dir) / "checkpoints"
    found = [path for path in root.glob("step_*") if is_complete(path)] if root.is_dir() else []
    return sorted(found, key=lambda path: int(path.name.split("_")[1]))


def probe_batch(prefix: str, sequences: int, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of held-out document windows: token ids [B, S] and their validity mask."""
    from megatron_grouter.offline.window_data import WindowBatches

    return WindowBatches(prefix, seq_length, sequences, seed=0, split="eval").batch(0)


def load_model(checkpoint: Path):
    """GPTModel of the run (config from train_state.json) with the checkpoint's weights."""
    from megatron.core import dist_checkpointing

    from megatron_grouter.runtime.seed import set_seed
    from megatron_grouter.training.config import ParallelConfig, to_train_config
    from megatron_grouter.training.model import build_gpt_model
    from megatron_grouter.training.safe_checkpoint_read import verify_checkpoint_safe

    verify_checkpoint_safe(checkpoint)  # before dist_checkpointing unpickles anything in it
    state = json.loads((checkpoint / "train_state.json").read_text())
    root = to_train_config(state["config"])
    if root.router.type not in ("topk", "probmoe"):
        raise UserError(f"{checkpoint} was trained with router.type={root.router.type}; routing "
                        "stability is measured for learned routers only (topk, probmoe)")
    set_seed(root.train.seed)
    model = build_gpt_model(root.model, root.router, ParallelConfig(), state["vocab_size"])
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))["model"]
    model.load_state_dict(loaded, strict=True)
    return model.eval()


@torch.no_grad()
def routing_sets(model, tokens_BS: torch.Tensor, mask_BS: torch.Tensor) -> list[np.ndarray]:
    """Per MoE layer: bool [valid tokens, E], True for the experts each probe token is sent to."""
    from megatron_grouter.training.model import moe_layers

    captured: list[torch.Tensor] = []
    layers = moe_layers(model)
    originals = []
    for layer in layers:
        meter = layer.router.load_meter
        originals.append(meter.record)
        # Every router of this project reports its routing map to its load meter: listen there.
        meter.record = lambda routing_map_TE, _keep=captured: _keep.append(routing_map_TE.detach().bool().cpu())
    try:
        batch, seq = tokens_BS.shape
        positions = torch.arange(seq).expand(batch, seq)
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]
        model(tokens_BS, positions, mask)
    finally:
        for layer, record in zip(layers, originals):
            layer.router.load_meter.record = record
    if len(captured) != len(layers):
        raise RuntimeError(f"captured {len(captured)} routing maps for {len(layers)} MoE layers")
    valid_T = mask_BS.transpose(0, 1).reshape(-1)  # megatron's token order is [S, B]
    return [routing_TE[valid_T].numpy() for routing_TE in captured]


def unchanged_share(before: list[np.ndarray], after: list[np.ndarray]) -> list[float]:
    """Per layer: share of tokens whose exact expert set is the same in both."""
    return [float(np.all(a == b, axis=1).mean()) for a, b in zip(before, after)]


def probe_run(run_dir: Path, prefix: str, sequences: int) -> dict:
    """Stability between each pair of consecutive checkpoints of one run."""
    from megatron_grouter.runtime.distributed import init_distributed

    checkpoints = run_checkpoints(run_dir)
    if len(checkpoints) < 2:
        raise UserError(f"{run_dir} has {len(checkpoints)} complete checkpoint(s); routing stability "
                        "needs at least 2: set target.checkpoint_interval below the run's train.steps")
    init_distributed()
    seq_length = json.loads((checkpoints[0] / "train_state.json").read_text())["config"]["train"]["seq_length"]
    tokens_BS, mask_BS = probe_batch(prefix, sequences, seq_length)
    steps, rows, previous = [], [], None
    for checkpoint in checkpoints:
        sets = routing_sets(load_model(checkpoint), tokens_BS, mask_BS)
        step = int(checkpoint.name.split("_")[1])
        if previous is not None:
            rows.append(unchanged_share(previous, sets))
            steps.append(step)
        previous = sets
        log.info("probe %s step %d%s", Path(run_dir).name, step,
                 f": unchanged {np.mean(rows[-1]):.3f}" if rows and steps[-1] == step else "")
    return {"run": str(run_dir), "steps": steps, "unchanged_LT": np.asarray(rows).T.tolist(),
            "probe_tokens": int(mask_BS.sum())}


def probe_main(argv: list[str]) -> dict:
    """Probe every run in --run, writing one JSON with all of them to --out."""
    from megatron_grouter.reproduce.stages import write_json_atomic
    from megatron_grouter.runtime.distributed import shutdown_distributed
    from megatron_grouter.training.loggers import setup_console_logging

    parser = argparse.ArgumentParser(prog="python -m megatron_grouter.reproduce.stability")
    parser.add_argument("--run", action="append", required=True, help="an mg-train run directory")
    parser.add_argument("--prefix", required=True, help="indexed dataset prefix for the probe batch")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_console_logging(True)
    try:
        results = {Path(run).name: probe_run(Path(run), args.prefix, args.sequences) for run in args.run}
    finally:
        shutdown_distributed()
    write_json_atomic(Path(args.out), results)
    return results


def main() -> None:
    import sys

    from megatron_grouter.app import run_app

    run_app(lambda argv: probe_main(argv), sys.argv[1:])


if __name__ == "__main__":
    main()
