"""Peak memory of the partial teacher load versus loading the whole Hugging Face model.

Builds (or takes) a deep MoE checkpoint, then measures each variant in its own fresh Python
process, so one variant's allocations cannot hide in another's peak:

  baseline  import torch + transformers + our package, nothing loaded
  partial   HFPartialSource(model_dir) and one router_logits call (first MoE layer)
  full      AutoModelForCausalLM.from_pretrained(model_dir) and one forward with output_router_logits

Each child imports everything first, then resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs resets VmHWM; getrusage's ru_maxrss cannot be reset and even carries the
parent's peak across exec), does its work and reads VmHWM: the peak resident set size of the work,
touched pages of memory-mapped safetensors files included. The summary prints the peak RSS, the
peak above the RSS right after imports, and the partial/full ratios. Linux only.

    python benchmarks/partial_loading_memory.py                      # 24-layer qwen3_moe, ~0.4 GB
    python benchmarks/partial_loading_memory.py --model-dir /models/X --moe-layer 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

INPUT_SHAPE = (2, 64)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1)) / 1024.0


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _token_batch(vocab_size: int):
    import torch

    return torch.randint(0, vocab_size, INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


def run_variant(variant: str, model_dir: str, moe_layer: int | None, build_shape: tuple[int, int, int]) -> dict:
    """Run one variant in this process and return its measurements."""
    import torch
    import transformers  # noqa: F401  (part of the baseline for every variant)

    from megatron_grouter.offline.sources.hf_partial import HFPartialSource

    torch.set_num_threads(1)
    rss_after_imports = _status_mib("VmRSS")
    _reset_peak_rss()
    started = time.perf_counter()
    result: dict = {"variant": variant}
    if variant == "partial":
        source = HFPartialSource(model_dir, moe_layer=moe_layer)
        logits_BSE = source.router_logits(_token_batch(source.vocab_size))
        result.update(tensors_read=source.tensors_read, bytes_read=source.bytes_read, moe_layer=source.moe_layer,
                      logits_sum=float(logits_BSE.sum()))
    elif variant == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
        with torch.no_grad():
            output = model(input_ids=_token_batch(model.config.vocab_size), output_router_logits=True)
        result.update(logits_sum=float(output.router_logits[0].float().sum()))
    elif variant == "build":
        build_deep_checkpoint(model_dir, *build_shape)
    elif variant != "baseline":
        raise ValueError(f"unknown variant {variant}")
    result.update(seconds=time.perf_counter() - started, peak_rss_mib=_status_mib("VmHWM"),
                  rss_after_imports_mib=rss_after_imports)
    return result


def build_deep_checkpoint(out_dir: str, layers: int, hidden: int, experts: int) -> str:
    """Save a random qwen3_moe checkpoint with `layers` MoE layers whose experts dominate its size."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
        num_experts=experts, num_experts_per_tok=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir, max_shard_size="50MB")
    return out_dir


def _measure_in_child(variant: str, model_dir: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, "--model-dir", model_dir,
               "--layers", str(args.layers), "--hidden", str(args.hidden), "--experts", str(args.experts)]
    if args.moe_layer is not None:
        command += ["--moe-layer", str(args.moe_layer)]
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="existing HF MoE checkpoint; default: build a deep random one")
    parser.add_argument("--moe-layer", type=int, default=None, help="MoE layer to read (default: first)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--child", choices=["build", "baseline", "partial", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        shape = (args.layers, args.hidden, args.experts)
        print(json.dumps(run_variant(args.child, args.model_dir, args.moe_layer, shape)))
        return

    with tempfile.TemporaryDirectory(prefix="partial_loading_") as scratch:
        model_dir = args.model_dir
        if model_dir is None:  # built in a child too, so this parent process stays small
            model_dir = os.path.join(scratch, "deep_moe")
            _measure_in_child("build", model_dir, args)
        checkpoint_mib = sum(
            os.path.getsize(os.path.join(model_dir, name)) for name in os.listdir(model_dir)
            if name.endswith(".safetensors")
        ) / 2**20
        results = {
            variant: _measure_in_child(variant, model_dir, args) for variant in ("baseline", "partial", "full")
        }

    print(f"checkpoint: {model_dir if args.model_dir else f'random qwen3_moe, {args.layers} layers'} "
          f"({checkpoint_mib:.1f} MiB of safetensors)")
    print(f"{'variant':<10}{'peak RSS MiB':>14}{'above imports':>15}{'seconds':>10}")
    for variant, result in results.items():
        above = result["peak_rss_mib"] - result["rss_after_imports_mib"]
        print(f"{variant:<10}{result['peak_rss_mib']:>14.1f}{above:>15.1f}{result['seconds']:>10.2f}")
    partial, full = results["partial"], results["full"]
    print(f"partial read {partial['tensors_read']} tensors, {partial['bytes_read'] / 2**20:.1f} MiB "
          f"(MoE layer {partial['moe_layer']})")
    print(f"peak RSS ratio partial/full: {partial['peak_rss_mib'] / full['peak_rss_mib']:.3f}")
    partial_above = partial["peak_rss_mib"] - partial["rss_after_imports_mib"]
    full_above = full["peak_rss_mib"] - full["rss_after_imports_mib"]
    print(f"above-imports ratio partial/full: {partial_above / full_above:.3f}")


if __name__ == "__main__":
    main()
