"""Distillation throughput on CPU for the default Grouter size (3 MHA layers, hidden 512, 8 heads)
against a small residual-linear Grouter, with the same teacher, data and batch, in one run.

Teacher: a random tiny Qwen3-MoE saved on disk over the default corpus's tokenizer (only its
layers up to the first router are loaded). Prints tokens/s of each and their ratio.

  .venv/bin/python benchmarks/distill_throughput.py [--steps 20] [--window 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a script, not a module: the test helpers are `tests.*` from the root


def tokens_per_s(out_dir: Path) -> float:
    rates = [json.loads(line)["tokens_per_s"] for line in (out_dir / "distill_metrics.jsonl").read_text().splitlines()
             if "tokens_per_s" in line]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from megatron_grouter.data.default_corpus import prepare_default_corpus
    from megatron_grouter.offline.distill import distill
    from tests.offline.distill_runs import compose_tool, tiny_teacher_on_corpus

    data = prepare_default_corpus(str(REPO / "data" / "stdlib"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = tiny_teacher_on_corpus("qwen3_moe", tmp / "teacher", str(data.tokenizer_dir), 4096)
        variants = {"default (mha, 3x512)": [],
                    "small (residual_linear, 1x128)": ["grouter.encoder=residual_linear",
                                                       "grouter.num_layers=1", "grouter.hidden_size=128"]}
        for name, extra in variants.items():
            out = tmp / name.split()[0]
            distill(compose_tool("distill", [
                "source.kind=hf", f"source.path={teacher}", f"data.prefix={data.prefix}",
                f"grouter.window={args.window}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                "train.log_interval=2", f"train.eval_interval={args.steps}", "train.eval_batches=1",
                f"out_dir={out}", *extra]))
            results[name] = tokens_per_s(out)
    for name, rate in results.items():
        print(f"distillation tokens/s, Grouter {name}: {rate:.0f}")
    default, small = results.values()
    print(f"ratio default / small Grouter: {default / small:.2f}x")


if __name__ == "__main__":
    main()
