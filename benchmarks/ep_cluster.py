"""EP=4 training over 2 emulated nodes: default layout + megatron's alltoall vs mg-plan-ep + planned.

Builds 2 network namespaces joined by one veth link shaped with tc tbf (reproduce/emulated_cluster.py),
runs mg-train at EP=4 with 2 ranks per node (gloo over TCP; intra-node ranks over their node's own
address, inter-node ranks over the link), cached Grouter routing, same model, data, seed and steps,
both layouts interleaved round by round (reproduce/ep_cluster_stage.py). Prints step time, tokens/s,
bytes across the link (the link's kernel counters), time in collectives, and the ratios; then the
α–β all-to-all model against the measured times and its prediction for EP 8/16/32 on 8-GPU nodes
(reproduce/ep_cluster_model.py). Needs root (network namespaces); skips with the reason otherwise.

  .venv/bin/python benchmarks/ep_cluster.py                         # 80 Mbit/s link, 2 rounds
  .venv/bin/python benchmarks/ep_cluster.py --rate-mbit 0           # unshaped link (all-to-all share)
  .venv/bin/python benchmarks/ep_cluster.py --out docs/results/ep_cluster.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


HOW_MEASURED = [
    "How measured: link bytes are the kernel tx counters of both veth ends (TCP/IP headers, gloo and "
    "TCPStore control traffic and the dense gradients' all-reduce included), read when rank 0 logs a "
    "step, between the first and last measured step. Collective times are a rank's seconds inside each "
    "call (transfer plus waiting for its peers), mean over the 4 ranks; 'share of step' is the token "
    "all-to-all time ÷ step time. Step time and tokens/s are the trainer's own per-step figures (median).",
    "Caveat: the machine has 2 CPU cores shared with other jobs, so compute time is inflated and noisy; "
    "the two layouts alternate run by run so that load drifts hit both alike.",
]


def scale_topk(work: Path, settings, num_experts: int = 64, samples: int = 2048):
    """Top-k routing of the first training samples by a random 64-expert Grouter (for EP up to
    32), routed here in windows of the Grouter's length (no second routing cache)."""
    import numpy as np
    import torch

    from megatron_grouter.data.gpt_datasets import build_gpt_datasets
    from megatron_grouter.data.tokenizer import load_tokenizer
    from megatron_grouter.grouter.checkpoint import load_grouter
    from megatron_grouter.reproduce.ep_cluster_stage import prepare_corpus, random_grouter

    data = prepare_corpus()
    path = random_grouter(data["tokenizer"], work / "grouter-e64", num_experts, settings.topk, seed=1)
    grouter = load_grouter(path)[0].eval()
    train_ds, _, _ = build_gpt_datasets(data["prefix"], load_tokenizer(data["tokenizer"]),
                                        seq_length=settings.seq_length, seed=settings.seed, split="96,2,2",
                                        num_samples=(samples, 0, 0),
                                        cache_dir=str(Path(data["out_dir"]) / "index_cache"))
    window = grouter.config.max_seq_length
    tokens_SL = torch.stack([torch.as_tensor(train_ds[i]["tokens"]) for i in range(samples)])
    with torch.no_grad():
        topk_WwK, _ = grouter.route(tokens_SL.reshape(-1, window))
    return topk_WwK.reshape(samples, settings.seq_length, -1).numpy().astype(np.int64), num_experts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate-mbit", type=float, default=80.0, help="link rate each way; 0: unshaped")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of every figure")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default, planned) ")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--grouter", default=None, help="a Grouter checkpoint (default: a random 16-expert one)")
    parser.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--no-scale", action="store_true", help="skip the EP 8/16/32 prediction")
    parser.add_argument("--tokens-per-rank", type=int, default=16384, help="for the EP 8/16/32 prediction")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    parser.add_argument("--json", default=None, help="also write every figure to this json file")
    parser.add_argument("--from-json", default=None, help="render the tables of a saved --json run (no runs)")
    args = parser.parse_args()

    from megatron_grouter.reproduce import ep_cluster_model, ep_cluster_stage
    from megatron_grouter.reproduce.emulated_cluster import missing_requirements

    if args.from_json:
        return render(json.loads(Path(args.from_json).read_text()), args)
    reason = missing_requirements()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    settings = ep_cluster_stage.ClusterSettings(rate_mbit=args.rate_mbit or None, steps=args.steps,
                                                warmup=args.warmup, rounds=args.rounds, threads=args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        inputs = ep_cluster_stage.prepare_inputs(work, settings, grouter=args.grouter)
        result = ep_cluster_stage.compare(inputs, settings, work / "runs")
        if not args.no_scale:
            topk_SLK, experts = scale_topk(work, settings)
            result["scale"] = ep_cluster_model.scale_predictions(topk_SLK, experts, tokens_per_rank=args.tokens_per_rank)
    result["command"] = "python benchmarks/ep_cluster.py " + " ".join(sys.argv[1:])
    result["wall_s"] = time.perf_counter() - started
    if args.json:
        from megatron_grouter.atomic_files import write_json_atomic

        write_json_atomic(args.json, result, default=float)
    return render(result, args)


def render(result: dict, args) -> int:
    """Print (and with --out write) the tables of a run's result; the model parts from this code."""
    from megatron_grouter.atomic_files import write_text_atomic
    from megatron_grouter.reproduce import ep_cluster_model, ep_cluster_stage

    lines = ep_cluster_stage.table_lines(result)
    rate = result["settings"]["rate_mbit"]
    if rate is not None:
        calibration = ep_cluster_model.calibrate(result["summary"], rate, result["settings"]["hidden_size"],
                                                 result["settings"]["num_layers"])
        lines += ["", *ep_cluster_model.calibration_lines(calibration)]
    if result.get("scale"):
        lines += ["", *ep_cluster_model.scale_lines(result["scale"], args.tokens_per_rank)]
    lines += ["", *HOW_MEASURED]
    wall = f" ({result['wall_s']:.0f} s wall)" if "wall_s" in result else ""
    lines += ["", f"command: `{result.get('command', 'python benchmarks/ep_cluster.py').strip()}`{wall}"]
    print("\n".join(lines))
    if args.out:
        write_text_atomic(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
