"""Validation loss against tokens: ProbMoE (exact-k, dynamic-k) against the aux-loss router.

Every run trains the same model on the default corpus with the same seed, data order and token
budget, in this invocation, one after the other (`mg-train` in a subprocess each). Prints the
validation-loss curve of each router against tokens, then per router its final validation loss,
the difference to aux_loss, the tokens it needs to reach aux_loss's final loss (linear
interpolation; "not reached" otherwise) and its training tokens/s as a ratio to aux_loss's.

  .venv/bin/python benchmarks/probmoe_convergence.py                      # tiny_cpu, 200 steps
  .venv/bin/python benchmarks/probmoe_convergence.py --steps 600 --eval-interval 50 model=tiny_qwen3
  .venv/bin/python benchmarks/probmoe_convergence.py --routers aux_loss probmoe_exact_k -- model=tiny_qwen3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_grouter.reproduce.metrics import RunMetrics, data_efficiency, read_run, throughput

REPO = Path(__file__).resolve().parent.parent
ROUTERS = ("aux_loss", "probmoe_exact_k", "probmoe_dynamic_k")


def train(router: str, steps: int, eval_interval: int, out_dir: Path, overrides: list[str]) -> RunMetrics:
    command = [sys.executable, "-m", "megatron_grouter.train", f"router={router}", f"train.steps={steps}",
               f"train.eval_interval={eval_interval}", "train.save_interval=-1", "train.resume=none",
               f"train.out_dir={out_dir}", *overrides]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{router} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return read_run(out_dir, router)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (model, data, train)")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for router in args.routers:
            print(f"training {router} ({args.steps} steps) ...", flush=True)
            runs[router] = train(router, args.steps, args.eval_interval, Path(tmp) / router, args.overrides)
    names = list(runs)
    print("\nvalidation loss against tokens")
    print(f"{'tokens':>10} " + " ".join(f"{name:>18}" for name in names))
    for row in range(min(len(run.evals) for run in runs.values())):
        print(f"{runs[names[0]].tokens[row]:>10.0f} " + " ".join(f"{runs[name].val_loss[row]:>18.4f}"
                                                               for name in names))
    baseline = runs[names[0]]
    print(f"\nagainst {baseline.name} (final validation loss {baseline.val_loss[-1]:.4f}):")
    for name, run in runs.items():
        reached = data_efficiency(baseline, run)["candidate_tokens"]
        reach = "not reached" if reached is None else f"{reached:,.0f} tokens"
        print(f"  {name:<18} final {run.val_loss[-1]:.4f} ({run.val_loss[-1] - baseline.val_loss[-1]:+.4f})  "
              f"reaches {baseline.name}'s final loss: {reach}  "
              f"tokens/s ratio {throughput(run) / throughput(baseline):.2f}x")

if __name__ == "__main__":
    main()
