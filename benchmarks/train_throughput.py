"""Training throughput of tiny_cpu: 1 process vs 2 processes with expert parallelism 2.

Both runs use the same model, data, global batch and step count, in the same invocation; the
figure is the median tokens/s over the steps after a warm-up. Prints the ratio EP=2 / 1 process.

  .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--threads-per-process 1]
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


def run(nproc: int, steps: int, threads: int, out_dir: Path, extra: list[str]) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_grouter.train", f"train.steps={steps}", "train.warmup_steps=2",
               "train.eval_interval=0", "train.save_interval=-1", "train.resume=none",
               f"train.out_dir={out_dir}", *(["parallel=ep2"] if nproc == 2 else []), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [record["tokens_per_s"] for record in records if "tokens_per_s" in record]
    return statistics.median(rates[len(rates) // 3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single = run(1, args.steps, args.threads_per_process, Path(tmp) / "single", args.overrides)
        expert_parallel = run(2, args.steps, args.threads_per_process, Path(tmp) / "ep2", args.overrides)
    print(f"tiny_cpu tokens/s  1 process: {single:.0f}   2 processes EP=2: {expert_parallel:.0f}")
    print(f"ratio EP=2 / 1 process: {expert_parallel / single:.2f}x "
          f"({args.threads_per_process} thread(s) per process)")


if __name__ == "__main__":
    main()
