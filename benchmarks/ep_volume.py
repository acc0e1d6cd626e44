"""EP dispatch volumes of the placement planner on a real routing cache over the default corpus.

The instance is what mg-train would train on: the first --samples samples (default 4,096 of 128
tokens, seed 1234, global batch 256) of the stdlib corpus's GPTDataset, routed by a distilled
Grouter's routing cache. For EP=4 and EP=8 and each planner method it prints, as ratios to the
default layout (contiguous experts, samples in order): (a) token-expert pairs leaving their rank,
(b) deduplicated sends (a token goes once to every other rank hosting any of its experts), the
busiest rank's sends, the capacity-free relaxation of the same expert groups (a lower bound for
any equal-share sample placement under them) and the planner's wall time; --out saves json.

  .venv/bin/python benchmarks/ep_volume.py --grouter outputs/ep-distill/grouter --cache outputs/ep-cache
  .venv/bin/python benchmarks/ep_volume.py            # builds the Grouter first (see --work)

Without --grouter it makes one with the real tools into --work: a short source MoE (mg-train,
32 experts top-4, 200 steps), mg-distill (300 steps) and mg-predispatch of the whole corpus —
CPU minutes for the first two, and the routing of 9.5M tokens (tens of minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
PREFIX, TOKENIZER = "data/stdlib/stdlib_text_document", "data/stdlib/tokenizer"


def run_tool(module: str, overrides: list[str]) -> None:
    print(f"$ python -m {module} {' '.join(overrides)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, env=env, check=True)


def build_grouter(work: Path) -> tuple[Path, Path]:
    """Source MoE → distilled Grouter → routing cache, with the project's own tools."""
    source, distilled, cache = work / "source", work / "distill", work / "cache"
    if not (source / "checkpoints").is_dir():
        run_tool("megatron_grouter.train", [
            "model.name=ep_source", "model.num_layers=2", "model.hidden_size=96", "model.num_attention_heads=4",
            "model.ffn_hidden_size=256", "model.num_experts=32", "model.moe_ffn_hidden_size=64", "model.topk=4",
            "train.steps=200", "train.warmup_steps=20", "train.eval_interval=0", "train.save_interval=0",
            f"data.prefix={PREFIX}", f"data.tokenizer={TOKENIZER}", f"train.out_dir={source}"])
    if not (distilled / "grouter").is_dir():
        run_tool("megatron_grouter.offline.distill", [
            "source.kind=megatron", f"source.path={source}", f"data.prefix={PREFIX}", "grouter.hidden_size=64",
            "grouter.num_layers=2", "grouter.num_heads=4", "grouter.window=128", "train.steps=300",
            "train.warmup_steps=30", "train.eval_interval=300", "train.save_interval=300", f"out_dir={distilled}"])
    run_tool("megatron_grouter.offline.predispatch", [
        f"grouter={distilled / 'grouter'}", f"data.prefix={PREFIX}", f"data.tokenizer={TOKENIZER}", f"cache={cache}"])
    return distilled / "grouter", cache


def training_instance(grouter: Path, cache: Path | None, samples: int, global_batch: int, seq_length: int):
    """(topk_SLK of mg-train's first `samples` samples, routing cache) — as mg-plan-ep reads them."""
    from megatron_grouter.offline.plan_ep import _open_routing_cache, _training_dataset
    from megatron_grouter.placement.training_samples import training_topk

    cfg = OmegaConf.create({"grouter": str(grouter), "cache": str(cache) if cache else None,
                            "data": {"prefix": PREFIX, "tokenizer": TOKENIZER, "out_dir": "data/stdlib",
                                     "split": "96,2,2"},
                            "train": {"seq_length": seq_length, "global_batch_size": global_batch, "seed": 1234,
                                      "steps": samples // global_batch, "eval_iters": 4}})
    routing_cache = _open_routing_cache(cfg)
    return training_topk(_training_dataset(cfg), routing_cache, samples, progress=False), routing_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grouter", type=Path, default=None, help="Grouter checkpoint (default: build one)")
    parser.add_argument("--cache", type=Path, default=None, help="its routing cache (default: beside the data)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "ep-volume")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--ep", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--methods", nargs="+", default=["paper", "coactivation", "joint"])
    parser.add_argument("--perturbations", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="json results")
    args = parser.parse_args()

    import torch

    from megatron_grouter.placement.planner import PlannerSettings, make_plan
    from megatron_grouter.placement.training_samples import cache_fingerprint

    torch.set_num_threads(1)
    grouter, cache = (args.grouter, args.cache) if args.grouter else build_grouter(args.work)
    started = time.perf_counter()
    topk_SLK, routing_cache = training_instance(grouter, cache, args.samples, args.global_batch, args.seq_length)
    num_experts = int(routing_cache.manifest["num_experts"])
    print(f"routing cache {routing_cache.directory}: {topk_SLK.shape} (samples, tokens, k), E={num_experts}, "
          f"global batch {args.global_batch} (read in {time.perf_counter() - started:.1f}s)")
    print(f"{'EP':>3} {'method':<13}{'dedup':>8}{'pairs':>8}{'maxsend':>9}{'bound':>8}{'seconds':>9}")
    results = []
    for ep in args.ep:
        for method in args.methods:
            settings = PlannerSettings(ep_size=ep, global_batch=args.global_batch, ranks_per_node=ep, method=method,
                                       perturbations=args.perturbations, search_samples=args.samples)
            started = time.perf_counter()
            _, report = make_plan(topk_SLK, num_experts, settings, cache_fingerprint(routing_cache.manifest))
            seconds = time.perf_counter() - started
            ratios = report.planned.ratios_to(report.default)
            bound = report.capacity_free_sends / report.default.dedup_sends_rank
            print(f"{ep:>3} {method:<13}{ratios['dedup_sends_rank']:>8.3f}{ratios['pairs_leaving_rank']:>8.3f}"
                  f"{ratios['max_sends_rank']:>9.3f}{bound:>8.3f}{seconds:>9.1f}", flush=True)
            results.append({"ep": ep, "method": method, "ratios": ratios, "bound": bound, "seconds": seconds,
                            "default": report.default.summary(), "planned": report.planned.summary()})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cache": str(routing_cache.directory), "samples": args.samples,
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
