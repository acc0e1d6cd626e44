"""Preemptive routing throughput on CPU: predispatch speed and size, and training tokens/s of
tiny_cpu with grouter_fixed (cached / online) against the aux_loss router, in one run.

  .venv/bin/python benchmarks/routing_throughput.py [--documents 200] [--steps 30] [--grouter DIR]

Without --grouter a random Grouter (3 MHA layers, hidden 128, window 128, 16 experts top-2) is
used: routing cost depends on the Grouter's size, not on what it learned.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def make_grouter(tokenizer_path: str, out_dir: Path) -> Path:
    from megatron_grouter.data.tokenizer import load_tokenizer
    from megatron_grouter.grouter.checkpoint import save_grouter
    from megatron_grouter.grouter.config import GrouterConfig
    from megatron_grouter.grouter.network import Grouter

    tokenizer = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    grouter = Grouter(GrouterConfig(vocab_size=tokenizer.vocab_size, num_experts=16, topk=2,
                                    hidden_size=128, num_layers=3, num_heads=4, max_seq_length=128))
    save_grouter(grouter, out_dir, provenance={"source_model": "random (benchmark)"},
                 tokenizer_fingerprint=tokenizer.fingerprint())
    return out_dir


def train_rate(overrides: list[str], out_dir: Path) -> float:
    command = [sys.executable, "-m", "megatron_grouter.train", *overrides, f"train.out_dir={out_dir}"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True,
                   env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    rates = [json.loads(line)["tokens_per_s"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
             if "tokens_per_s" in line]
    return statistics.median(rates[len(rates) // 3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--grouter", default=None)
    args = parser.parse_args()
    from megatron_grouter.data.default_corpus import prepare_corpus, prepare_default_corpus
    from megatron_grouter.offline.predispatch import predispatch
    from omegaconf import OmegaConf

    base = prepare_default_corpus(str(REPO / "data" / "stdlib"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = prepare_corpus("stdlib", str(tmp / "corpus"), tokenizer=str(base.tokenizer_dir),
                                max_documents=args.documents, progress=False)
        grouter = Path(args.grouter) if args.grouter else make_grouter(str(base.tokenizer_dir), tmp / "grouter")
        cache = tmp / "cache"
        started = time.perf_counter()
        stats = predispatch(OmegaConf.create({"grouter": str(grouter), "cache": str(cache), "chunk_windows": 64,
                                              "data": {"prefix": str(corpus.prefix),
                                                       "tokenizer": str(base.tokenizer_dir)}}))
        elapsed = time.perf_counter() - started
        size = sum(path.stat().st_size for path in cache.glob("*.bin"))
        common = [f"data.prefix={corpus.prefix}", f"data.tokenizer={base.tokenizer_dir}",
                  f"data.out_dir={tmp / 'corpus'}", f"train.steps={args.steps}", "train.warmup_steps=2",
                  "train.eval_interval=0", "train.save_interval=-1", "train.resume=none"]
        grouter_args = [f"router.grouter.path={grouter}", f"router.grouter.cache={cache}"]
        aux = train_rate([*common, "router=aux_loss"], tmp / "aux")
        cached = train_rate([*common, "router=grouter_fixed", "router.grouter.source=cached", *grouter_args],
                            tmp / "cached")
        online = train_rate([*common, "router=grouter_fixed", "router.grouter.source=online", *grouter_args],
                            tmp / "online")
    print(f"predispatch: {stats['tokens']} tokens in {elapsed:.1f}s = {stats['tokens'] / elapsed:.0f} tokens/s; "
          f"{size / stats['tokens']:.2f} bytes/token on disk (k·(1+2) = {stats['bytes_per_token']})")
    print(f"training tokens/s  aux_loss: {aux:.0f}  grouter_fixed cached: {cached:.0f}  online: {online:.0f}")
    print(f"ratio cached / aux_loss: {cached / aux:.2f}x   online / aux_loss: {online / aux:.2f}x")


if __name__ == "__main__":
    main()
