"""Tuning objectives side by side: held-out MaxVioGlobal and top-k agreement with the distilled Grouter.

Each objective tunes a copy of the same Grouter on the same windows with the same budget and
held-out stop rule; the table gives, per objective, the tokens it used, why it stopped, held-out
MaxVioGlobal before → after and top-k agreement with the untuned Grouter, and both as ratios to
the baseline objective `weights` (the paper's: balance loss alone) measured in the same run.
Which objective trains the better target model is for the target runs' validation loss to say
(mg-reproduce '+tune.variants.kl=["kl_weight=1"]' with target router grouter_tuned_kl); this only shows what each gives up for balance.

    python benchmarks/tuning_objectives.py --grouter G --prefix data/stdlib/stdlib_text_document \
        --objectives weights weights+kl0.3 weights+kl1 bias --max-tokens 500000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def settings_for(objective: str, args):
    from megatron_grouter.offline.tuning import TuneSettings

    common = dict(batch_size=args.batch_size, max_tokens=args.max_tokens, target_max_vio=args.target_max_vio,
                  eval_tokens=args.eval_tokens, stop_tokens=args.stop_tokens, check_interval=args.check_interval)
    if objective.startswith("weights+kl"):
        return TuneSettings(mode="weights", kl_weight=float(objective[len("weights+kl"):]), **common)
    return TuneSettings(mode=objective, **common)


def main() -> None:
    import torch

    from megatron_grouter.grouter.checkpoint import load_grouter
    from megatron_grouter.offline.tuning import tune_grouter
    from megatron_grouter.offline.window_data import WindowBatches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grouter", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--objectives", nargs="+", default=["weights", "weights+kl0.3", "weights+kl1", "bias"])
    parser.add_argument("--max-tokens", type=int, default=500_000)
    parser.add_argument("--target-max-vio", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--stop-tokens", type=int, default=50_000)
    parser.add_argument("--check-interval", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    grouter, _ = load_grouter(args.grouter)
    window = grouter.config.max_seq_length
    rows = []
    for objective in args.objectives:
        settings = settings_for(objective, args)
        torch.manual_seed(settings.seed)
        train = WindowBatches(args.prefix, window, settings.batch_size, settings.seed, "train")
        held_out = WindowBatches(args.prefix, window, 1, settings.seed, "eval")
        result = tune_grouter(grouter, train, held_out, settings, progress=False)
        rows.append((objective, result))
    baseline = dict(rows).get("weights")
    print(f"{'objective':<16} {'tokens':>9} {'MaxVio before':>13} {'after':>7} {'agreement':>9} "
          f"{'MaxVio÷weights':>14} {'agreement÷weights':>17}  stopped by")
    for objective, result in rows:
        vio, agreement = result.after["max_vio_global"], result.after["topk_agreement"]
        ratios = ("n/a", "n/a") if baseline is None else (
            f"{vio / max(baseline.after['max_vio_global'], 1e-12):.3f}",
            f"{agreement / max(baseline.after['topk_agreement'], 1e-12):.3f}")
        print(f"{objective:<16} {result.tokens:>9} {result.before['max_vio_global']:>13.3f} {vio:>7.3f} "
              f"{agreement:>9.3f} {ratios[0]:>14} {ratios[1]:>17}  {result.stopped_by}")


if __name__ == "__main__":
    main()
