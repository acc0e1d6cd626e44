"""Training throughput and optimizer memory of tiny_cpu, each against a named baseline, same run.

  --compare ep              1 process vs 2 processes with expert parallelism 2 (tokens/s ratio)
  --compare optimizer       megatron-core's optimizer + schedules (this tree) vs the old trainer's
                            torch-AdamW-over-main_grad step (git ref --baseline-ref, checked out
                            into a temporary worktree); target ≥ 0.95×
  --compare distributed     optimizer state bytes per rank at DP=2, distributed optimizer vs not;
                            target ≈ 0.5×

Every figure is the median tokens/s over the steps after the first third.

  .venv/bin/python benchmarks/train_throughput.py --compare optimizer [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The last commit whose trainer stepped torch AdamW over main_grad itself.
OLD_TRAINER_REF = "cc40969"


def run(nproc: int, steps: int, threads: int, out_dir: Path, extra: list[str],
        repo: Path = REPO) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_grouter.train", f"train.steps={steps}", "train.warmup_steps=2",
               "train.eval_interval=0", "train.save_interval=-1", "train.resume=none",
               f"train.out_dir={out_dir}", f"data.out_dir={REPO / 'data' / 'stdlib'}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(repo))
    subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def tokens_per_s(records: list[dict]) -> float:
    rates = [record["tokens_per_s"] for record in records if "tokens_per_s" in record]
    return statistics.median(rates[len(rates) // 3:])


def compare_ep(args, tmp: Path) -> None:
    single = tokens_per_s(run(1, args.steps, args.threads_per_process, tmp / "single", args.overrides))
    ep2 = tokens_per_s(run(2, args.steps, args.threads_per_process, tmp / "ep2",
                           ["parallel=ep2", *args.overrides]))
    print(f"tiny_cpu tokens/s  1 process: {single:.0f}   2 processes EP=2: {ep2:.0f}")
    print(f"ratio EP=2 / 1 process: {ep2 / single:.2f}x ({args.threads_per_process} thread(s) per process)")


def compare_optimizer(args, tmp: Path) -> None:
    old_tree = tmp / "old_trainer"
    subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.baseline_ref], cwd=REPO,
                   check=True, capture_output=True)
    try:
        rates = {"old": [], "megatron": []}
        for repeat in range(args.repeats):  # alternate, so load drifts hit both alike
            rates["old"].append(tokens_per_s(run(1, args.steps, args.threads_per_process,
                                                 tmp / f"old{repeat}", args.overrides, old_tree)))
            rates["megatron"].append(tokens_per_s(run(1, args.steps, args.threads_per_process,
                                                      tmp / f"new{repeat}", args.overrides)))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO, check=False)
    old, new = statistics.median(rates["old"]), statistics.median(rates["megatron"])
    print(f"tiny_cpu tokens/s  old AdamW step ({args.baseline_ref}): {old:.0f}   "
          f"megatron optimizer + schedule: {new:.0f}")
    print(f"ratio megatron / old: {new / old:.2f}x (target >= 0.95x; {args.repeats} alternating runs each)")


def compare_distributed(args, tmp: Path) -> None:
    def state_bytes(extra):
        records = run(2, 3, args.threads_per_process, tmp / ("do" if extra else "plain"),
                      [*extra, *args.overrides])
        return next(r["optimizer/state_bytes_rank0"] for r in records if "optimizer/state_bytes_rank0" in r)

    plain = state_bytes([])
    sharded = state_bytes(["parallel.distributed_optimizer=true"])
    print(f"tiny_cpu optimizer state per rank at DP=2: non-distributed {plain / 2**20:.2f} MiB   "
          f"distributed {sharded / 2**20:.2f} MiB")
    print(f"ratio distributed / non-distributed: {sharded / plain:.2f}x (target ~0.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=["ep", "optimizer", "distributed"], default="ep")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--baseline-ref", default=OLD_TRAINER_REF)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        {"ep": compare_ep, "optimizer": compare_optimizer,
         "distributed": compare_distributed}[args.compare](args, Path(tmp))


if __name__ == "__main__":
    main()
