"""Offline router conversion on the default corpus: affinity and tuning speed, folding quality, balance.

Without --grouter it builds a random Grouter with decisive routing (score weights ×50) and an extra
logit on a quarter of its experts, standing in for a distilled Grouter that is imbalanced on the
target data. Prints affinity tokens/s; within-group co-activation of affinity / balance / random
folding to E/2; and for both tuning modes tokens/s, MaxVioGlobal and top-k agreement with the
untuned Grouter before/after on held-out windows.

  .venv/bin/python benchmarks/grouter_conversion.py
  .venv/bin/python benchmarks/grouter_conversion.py --grouter outputs/grouter-distill/grouter --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from megatron_grouter.data.default_corpus import prepare_default_corpus
from megatron_grouter.data.tokenizer import load_tokenizer
from megatron_grouter.grouter.checkpoint import load_grouter
from megatron_grouter.grouter.config import GrouterConfig
from megatron_grouter.grouter.network import Grouter
from megatron_grouter.offline.affinity import compute_affinity
from megatron_grouter.offline.folding import fold_groups, within_group_mass
from megatron_grouter.offline.tuning import TuneSettings, tune_grouter
from megatron_grouter.offline.window_data import WindowBatches

REPO = Path(__file__).resolve().parent.parent


def stand_in_grouter(vocab_size: int, args) -> Grouter:
    torch.manual_seed(args.seed)
    grouter = Grouter(GrouterConfig(vocab_size=vocab_size, num_experts=args.experts, topk=args.topk,
                                    hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                                    max_seq_length=args.window))
    with torch.no_grad():
        grouter.score.weight.mul_(50)
        grouter.score.bias[: max(1, args.experts // 4)] += args.extra_logit
    return grouter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grouter", default=None, help="a Grouter checkpoint (default: a random stand-in)")
    parser.add_argument("--data-dir", default=str(REPO / "data" / "stdlib"))
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--extra-logit", type=float, default=4.0)
    parser.add_argument("--affinity-tokens", type=int, default=300_000)
    parser.add_argument("--tune-tokens", type=int, default=2_000_000)
    parser.add_argument("--target-max-vio", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)

    paths = prepare_default_corpus(args.data_dir, vocab_size=4096)
    if args.grouter:
        grouter, _ = load_grouter(args.grouter, expected_tokenizer=load_tokenizer(paths.tokenizer_dir).fingerprint())
    else:
        grouter = stand_in_grouter(load_tokenizer(paths.tokenizer_dir).vocab_size, args)
    config = grouter.config
    print(f"Grouter: E={config.num_experts} top-{config.topk} hidden {config.hidden_size} × {config.num_layers} "
          f"layers, window {config.max_seq_length}; device {device}; torch threads {torch.get_num_threads()}")
    window = config.max_seq_length
    train = WindowBatches(str(paths.prefix), window, 16, args.seed, "train")
    held_out = WindowBatches(str(paths.prefix), window, 16, args.seed, "eval")

    affinity = compute_affinity(grouter, train, batch_size=16, max_tokens=args.affinity_tokens, device=device,
                                progress=False)
    print(f"affinity: {affinity.tokens} tokens, {affinity.tokens_per_s:,.0f} tokens/s")
    target = config.num_experts // 2
    masses = {strategy: within_group_mass(affinity.matrix, fold_groups(affinity.matrix, target, strategy, args.seed))
              for strategy in ("affinity", "balance", "random")}
    print(f"fold {config.num_experts} → {target}: within-group co-activation "
          + ", ".join(f"{name} {mass:.3f}" for name, mass in masses.items())
          + f" (affinity/random {masses['affinity'] / max(masses['random'], 1e-12):.2f}x)")

    for mode in ("weights", "bias"):
        settings = TuneSettings(mode=mode, batch_size=16, max_tokens=args.tune_tokens,
                                target_max_vio=args.target_max_vio, eval_tokens=100_000, seed=args.seed)
        started = time.perf_counter()
        result = tune_grouter(grouter, train, held_out, settings, device, progress=False)
        print(f"tune ({mode}): {result.tokens} tokens at {result.tokens_per_s:,.0f} tokens/s "
              f"({time.perf_counter() - started:.1f}s with evaluation), stopped by {result.stopped_by}; held-out "
              f"MaxVioGlobal {result.before['max_vio_global']:.3f} → {result.after['max_vio_global']:.3f}, top-k "
              f"agreement with untuned {result.before['topk_agreement']:.3f} → {result.after['topk_agreement']:.3f} "
              f"({result.after['tokens']} tokens)")


if __name__ == "__main__":
    main()
