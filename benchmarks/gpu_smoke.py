"""GPU smoke: the CUDA paths that CPU tests cannot run, in one script (≤ 8 minutes on one H200).

  python benchmarks/gpu_smoke.py [--out DIR] [--cpu]

1. setup      this machine's stdlib tokenised (4k BPE), a random causal Grouter (E=8, k=2) and its
              routing cache (mg-predispatch)
2. steps      mg-train, one process: Transformer Engine spec (when it imports), grouped GEMM, bf16,
              the distributed optimizer, Megatron-LM's fusions, cached Grouter routing; steps 2–5
              under torch.cuda.set_sync_debug_mode("warn"), every synchronising call attributed to
              the code that made it (ours must be none); save at step 5; resume; 5 more steps,
              compared with an uninterrupted 10-step run
3. throughput tiny_qwen3 (E=128, k=8), seq 2048: tokens/s and peak memory with the cached Grouter
              and with megatron's TopKRouter (aux loss), same run; ratio
4. probmoe    ProbMoE router ÷ TopKRouter, forward + backward, E=64, k=8 (probmoe_router_speed.py)

Prints one line per result and `SMOKE OK` / `SMOKE FAILED (...)` last; exit 1 on failure.
`--cpu` runs phases 1–2 with a tiny model on the CPU (no TE, fp32, host reads counted by
runtime/host_syncs.py instead of CUDA's sync debug mode): the script's own test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY = ["model=tiny_cpu", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64", "train.seq_length=64",
        "train.micro_batch_size=4", "train.global_batch_size=8"]
GPU_MODEL = ["model=tiny_cpu", "train.seq_length=512",
             "train.micro_batch_size=4", "train.global_batch_size=16", "train.bf16=true",
             "parallel.distributed_optimizer=true"]
failures: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def python_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{module} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def environment(cpu: bool) -> None:
    import torch

    from megatron_grouter.megatron_compat import installed_version
    from megatron_grouter.training.model import transformer_engine_available

    device = "cpu" if cpu else torch.cuda.get_device_name()
    te = "none"
    if transformer_engine_available():
        import transformer_engine

        te = transformer_engine.__version__
    print(f"torch {torch.__version__}, megatron-core {installed_version()}, transformer-engine {te}, "
          f"device {device}", flush=True)


def routed_by_random_grouter(out: Path, name: str, data_prefix: str, tokenizer_dir: str, experts: int,
                             topk: int) -> list[str]:
    """A random causal Grouter over the corpus's tokenizer and its routing cache: the overrides
    that train with it."""
    import torch

    from megatron_grouter.data.tokenizer import load_tokenizer
    from megatron_grouter.grouter.checkpoint import save_grouter
    from megatron_grouter.grouter.config import GrouterConfig
    from megatron_grouter.grouter.network import Grouter

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    grouter = Grouter(GrouterConfig(vocab_size=tokenizer.vocab_size, num_experts=experts, topk=topk,
                                    hidden_size=64, num_layers=1, num_heads=4, max_seq_length=512, causal=True))
    with torch.no_grad():
        grouter.score.weight.mul_(50)  # decisive routing, like a distilled Grouter's
    save_grouter(grouter, out / name, provenance={"source_model": "random (gpu smoke)"},
                 tokenizer_fingerprint=tokenizer.fingerprint())
    python_module("megatron_grouter.offline.predispatch", f"grouter={out / name}", f"data.prefix={data_prefix}",
                  f"data.tokenizer={tokenizer_dir}", f"cache={out / (name + '_cache')}")
    return ["router=grouter_fixed", f"router.grouter.path={out / name}", "router.grouter.source=cached",
            f"router.grouter.cache={out / (name + '_cache')}", f"model.num_experts={experts}", f"model.topk={topk}"]


def setup(out: Path, cpu: bool) -> dict:
    """Tokenised corpus; random causal Grouters (E=8 k=2, and E=128 k=8 for tiny_qwen3) with caches."""
    prefix = out / "data" / "stdlib"
    python_module("megatron_grouter.offline.preprocess", "--input", "stdlib", "--train-tokenizer",
                  "--vocab-size", "4096", "--max-documents", "60" if cpu else "400",
                  "--output-prefix", str(prefix), "--no-progress")
    data_prefix, tokenizer_dir = f"{prefix}_text_document", str(prefix.parent / "tokenizer")
    prepared = {"data": [f"data.prefix={data_prefix}", f"data.tokenizer={tokenizer_dir}",
                         f"data.out_dir={out / 'data'}", "data.split='90,5,5'"],
                "grouter": routed_by_random_grouter(out, "grouter_e8", data_prefix, tokenizer_dir, 8, 2)}
    if not cpu:
        prepared["grouter_qwen"] = routed_by_random_grouter(out, "grouter_e128", data_prefix, tokenizer_dir, 128, 8)
    report("setup", True, f"corpus {data_prefix}; random causal Grouters and their routing caches")
    return prepared


def train(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from megatron_grouter.app import CONF_DIR
    from megatron_grouter.train import train as train_app
    from megatron_grouter.training.config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return train_app(compose(config_name="config", overrides=overrides))


def losses(out_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in record}


class SyncWatch:
    """Synchronising calls inside Trainer.train_step from step 2 on, by origin. CUDA: the sync
    debug mode's warnings (their Python frame); CPU: runtime/host_syncs.HostSyncCounter."""

    def __init__(self, cpu: bool):
        from megatron_grouter.runtime.host_syncs import HostSyncCounter

        self.cpu = cpu
        self.counter = HostSyncCounter() if cpu else None
        self.origins: dict[str, int] = {}

    def _note(self, filename: str, line: int) -> None:
        origin = ("megatron_grouter" if "/megatron_grouter/" in filename
                  else "megatron" if "/megatron/core/" in filename else "other") + f":{Path(filename).name}:{line}"
        self.origins[origin] = self.origins.get(origin, 0) + 1

    def install(self):
        import torch

        from megatron_grouter.training.trainer import Trainer

        original, watch = Trainer.train_step, self

        @functools.wraps(original)
        def train_step(trainer):
            if trainer.step == 0:
                return original(trainer)
            if watch.cpu:
                before = watch.counter.counts.copy()
                watch.counter.counting = True
                try:
                    return original(trainer)
                finally:
                    watch.counter.counting = False
                    for origin, calls in (watch.counter.counts - before).items():
                        watch.origins[origin] = watch.origins.get(origin, 0) + calls
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return original(trainer)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    for warning in caught:
                        if "synchroniz" in str(warning.message):
                            watch._note(warning.filename, warning.lineno)

        Trainer.train_step = train_step
        if self.counter is not None:
            self.counter.__enter__()
        return original

    def uninstall(self, original) -> None:
        from megatron_grouter.training.trainer import Trainer

        Trainer.train_step = original
        if self.counter is not None:
            self.counter.__exit__(None, None, None)

    def ours(self) -> dict[str, int]:
        return {origin: calls for origin, calls in self.origins.items() if origin.startswith("megatron_grouter")}


def steps(out: Path, prepared: dict, cpu: bool) -> None:
    model = TINY if cpu else [*GPU_MODEL, "model.grouped_gemm=true"]
    common = [*prepared["data"], *prepared["grouter"], *model, "train.steps=10", "train.warmup_steps=2",
              "train.eval_interval=0", "train.log_interval=5", "logger.console=true"]
    straight, resumed = out / "straight", out / "resumed"
    watch = SyncWatch(cpu)
    original = watch.install()
    try:
        started = time.perf_counter()
        train([*common, "train.save_interval=5", "train.max_steps_this_run=5", f"train.out_dir={resumed}"])
    finally:
        watch.uninstall(original)
    ours = watch.ours()
    megatrons = sum(calls for origin, calls in watch.origins.items() if origin.startswith("megatron:"))
    report("no host syncs of ours in steps 2-5", not ours,
           f"ours {ours or 0}; megatron-core's {megatrons} ({', '.join(sorted(o for o in watch.origins if o.startswith('megatron:')))})")
    train([*common, "train.save_interval=5", f"train.out_dir={resumed}"])
    train([*common, "train.save_interval=-1", f"train.out_dir={straight}"])
    one, two = losses(straight), losses(resumed)
    finite = all(value == value and abs(value) < 1e4 for value in two.values())
    same = sorted(two) == list(range(1, 11)) and all(abs(one[step] - two[step]) <= 1e-6 * abs(one[step]) for step in one)
    report("save at 5, resume, 5 more = uninterrupted 10 steps", finite and same,
           f"losses {[round(two[step], 4) for step in sorted(two)]} vs {[round(one[step], 4) for step in sorted(one)]}; "
           f"{time.perf_counter() - started:.0f} s")


def throughput(out: Path, prepared: dict) -> None:
    import torch

    results = {}
    qwen = ["model=tiny_qwen3", "train.seq_length=2048", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.bf16=true", "train.steps=12", "train.warmup_steps=2", "train.eval_interval=0",
            "train.save_interval=-1", "train.log_interval=1", *prepared["data"]]
    for name, router in (("grouter", prepared["grouter_qwen"]), ("topk_aux_loss", ["router=aux_loss"])):
        torch.cuda.reset_peak_memory_stats()
        run_dir = out / f"qwen_{name}"
        train([*qwen, *router, f"train.out_dir={run_dir}"])
        rates = [record["tokens_per_s"] for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                 if "tokens_per_s" in record]
        results[name] = (statistics.median(rates[2:]), torch.cuda.max_memory_allocated() / 2**30)
        print(f"tiny_qwen3 (E=128 k=8) {name}: {results[name][0]:,.0f} tokens/s, "
              f"peak {results[name][1]:.2f} GiB", flush=True)
    ratio = results["grouter"][0] / results["topk_aux_loss"][0]
    report("tiny_qwen3 throughput, Grouter / TopKRouter", ratio > 0.9,
           f"{ratio:.2f}x tokens/s, peak memory {results['grouter'][1]:.2f} vs {results['topk_aux_loss'][1]:.2f} GiB")


def probmoe() -> None:
    result = python_module("benchmarks.probmoe_router_speed", "--device", "cuda", "--tokens", "8192",
                           "--hidden", "512", "--repeats", "5", timeout=300)
    lines = [line for line in result.stdout.splitlines() if "÷" in line or "/" in line or "ratio" in line.lower()]
    print("\n".join(lines[-8:]), flush=True)
    report("probmoe router speed", True, "see the lines above (E=64 and 128, k=8)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--cpu", action="store_true", help="phases 1–2 on the CPU with a tiny model")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device: run on a GPU machine, or pass --cpu for the script's CPU check", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        environment(args.cpu)
        prepared = setup(out, args.cpu)
        for name, phase in [("steps", lambda: steps(out, prepared, args.cpu))] + (
                [] if args.cpu else [("throughput", lambda: throughput(out, prepared)), ("probmoe", probmoe)]):
            started = time.perf_counter()
            try:
                phase()
            except Exception as error:  # report every phase, then fail
                report(name, False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            print(f"-- {name}: {time.perf_counter() - started:.0f} s", flush=True)
    print("SMOKE OK" if not failures else f"SMOKE FAILED ({', '.join(failures)})", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
