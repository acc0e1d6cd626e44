"""Validation loss against tokens: ProbMoE (exact-k, dynamic-k) against the aux-loss router.

Every run trains the same model on the default corpus with the same seed, data order and token
budget, in this invocation, one after the other (`mg-train` in a subprocess each). Prints the
validation-loss curve of each router against tokens, then per router its final validation loss,
the difference to aux_loss, the tokens it needs to reach aux_loss's final loss (linear
interpolation; "not reached" otherwise) and its training tokens/s as a ratio to aux_loss's.

  .venv/bin/python benchmarks/probmoe_convergence.py                      # tiny_cpu, 200 steps
  .venv/bin/python benchmarks/probmoe_convergence.py --steps 600 --eval-interval 50 model=tiny_qwen3
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
ROUTERS = ("aux_loss", "probmoe_exact_k", "probmoe_dynamic_k")


def train(router: str, steps: int, eval_interval: int, out_dir: Path, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "megatron_grouter.train", f"router={router}", f"train.steps={steps}",
               f"train.eval_interval={eval_interval}", "train.save_interval=-1", "train.resume=none",
               f"train.out_dir={out_dir}", *overrides]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{router} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count at which the (linearly interpolated) validation curve reaches target."""
    for (tokens_a, loss_a), (tokens_b, loss_b) in zip(curve, curve[1:]):
        if loss_b <= target:
            if loss_a <= target:
                return float(tokens_a)
            return tokens_a + (tokens_b - tokens_a) * (loss_a - target) / (loss_a - loss_b)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (model, data, train)")
    args = parser.parse_args()
    curves, speeds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for router in args.routers:
            print(f"training {router} ({args.steps} steps) ...", flush=True)
            records = train(router, args.steps, args.eval_interval, Path(tmp) / router, args.overrides)
            curves[router] = [(record["tokens"], record["val_loss"]) for record in records if "val_loss" in record]
            rates = [record["tokens_per_s"] for record in records if "tokens_per_s" in record]
            speeds[router] = statistics.median(rates[len(rates) // 3:])
    names = list(curves)
    print("\nvalidation loss against tokens")
    print(f"{'tokens':>10} " + " ".join(f"{name:>18}" for name in names))
    for row in range(min(len(curve) for curve in curves.values())):
        print(f"{curves[names[0]][row][0]:>10} " + " ".join(f"{curves[name][row][1]:>18.4f}" for name in names))
    baseline = names[0]
    target = curves[baseline][-1][1]
    print(f"\nagainst {baseline} (final validation loss {target:.4f}):")
    for name in names:
        final = curves[name][-1][1]
        reached = tokens_to_reach(curves[name], target)
        reach = "not reached" if reached is None else f"{reached:,.0f} tokens"
        print(f"  {name:<18} final {final:.4f} ({final - target:+.4f})  reaches {baseline}'s final loss: "
              f"{reach}  tokens/s ratio {speeds[name] / speeds[baseline]:.2f}x")


if __name__ == "__main__":
    main()
