"""EP=4 training over 2 emulated nodes: default layout + megatron's alltoall vs mg-plan-ep + planned.

Builds 2 network namespaces joined by one veth link shaped with tc tbf (reproduce/emulated_cluster.py),
runs mg-train at EP=4 with 2 ranks per node (gloo over TCP; intra-node ranks over their node's own
address, inter-node ranks over the link), cached Grouter routing, same model, data, seed and steps,
both layouts interleaved round by round (reproduce/ep_cluster_stage.py). Prints step time, tokens/s,
bytes across the link (the link's kernel counters), time in collectives, and the ratios; then the
α–β all-to-all model against the measured times and its prediction for EP 8/16/32 on 8-GPU nodes
(reproduce/ep_cluster_model.py). Needs root (network namespaces); skips with the reason otherwise.

  .venv/bin/python benchmarks/ep_cluster.py                         # 40 Mbit/s link, 2 rounds
  .venv/bin/python benchmarks/ep_cluster.py --rate-mbit 0           # unshaped link (all-to-all share)
  .venv/bin/python benchmarks/ep_cluster.py --out docs/results/ep_cluster.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def scale_topk(work: Path, settings, num_experts: int = 64):
    """Top-k routing of training samples by a random 64-expert Grouter (for EP up to 32)."""
    from megatron_grouter.offline.plan_ep import _open_routing_cache, _training_dataset
    from megatron_grouter.offline.predispatch import predispatch
    from megatron_grouter.placement.training_samples import training_topk
    from megatron_grouter.reproduce.ep_cluster_stage import _compose_tool, random_grouter
    from megatron_grouter.reproduce.ep_cluster_stage import prepare_corpus as corpus

    data = corpus()
    grouter = random_grouter(data["tokenizer"], work / "grouter-e64", num_experts, settings.topk, seed=1)
    cache = work / "cache-e64"
    predispatch(_compose_tool("predispatch", [f"grouter={grouter}", f"data.prefix={data['prefix']}",
                                              f"data.tokenizer={data['tokenizer']}", f"cache={cache}",
                                              "chunk_windows=16"]))
    cfg = _compose_tool("plan_ep", [f"grouter={grouter}", f"cache={cache}", f"data.prefix={data['prefix']}",
                                    f"data.tokenizer={data['tokenizer']}", f"data.out_dir={data['out_dir']}",
                                    "train.global_batch_size=64", "train.steps=64", "train.eval_iters=1",
                                    f"train.seq_length={settings.seq_length}", "out=unused.npz"])
    return training_topk(_training_dataset(cfg), _open_routing_cache(cfg), 64 * 64, progress=False), num_experts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate-mbit", type=float, default=40.0, help="link rate each way; 0: unshaped")
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
    args = parser.parse_args()

    from megatron_grouter.reproduce import ep_cluster_model, ep_cluster_stage
    from megatron_grouter.reproduce.emulated_cluster import missing_requirements

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
        lines = ep_cluster_stage.table_lines(result)
        if settings.rate_mbit is not None:
            result["calibration"] = ep_cluster_model.calibrate(result["summary"], settings.rate_mbit,
                                                               settings.hidden_size)
            lines += ["", *ep_cluster_model.calibration_lines(result["calibration"])]
        if not args.no_scale:
            topk_SLK, experts = scale_topk(work, settings)
            result["scale"] = ep_cluster_model.scale_predictions(topk_SLK, experts, tokens_per_rank=args.tokens_per_rank)
            lines += ["", *ep_cluster_model.scale_lines(result["scale"], args.tokens_per_rank)]
    command = "python benchmarks/ep_cluster.py " + " ".join(sys.argv[1:])
    lines += ["", f"command: `{command.strip()}` ({time.perf_counter() - started:.0f} s wall)"]
    print("\n".join(lines))
    from megatron_grouter.atomic_files import write_json_atomic, write_text_atomic

    if args.json:
        write_json_atomic(args.json, result)
    if args.out:
        write_text_atomic(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
