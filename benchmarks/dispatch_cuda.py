"""The planned dispatcher on one GPU (EP=1, NCCL): parity with allgather, device→host syncs, time.

One process cannot run an all-to-all between GPUs, so this checks what a single GPU can: the
CUDA path of the planned dispatcher gives megatron's allgather dispatcher's output and gradients,
a whole MoE-layer step with a plan runs under torch.cuda.set_sync_debug_mode("error") (no
device→host sync anywhere in router, dispatcher or experts), and the step times of planned,
counted and allgather, measured in the same run.

  python benchmarks/dispatch_cuda.py [--tokens 16384 --hidden 2048 --experts 64 --topk 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from dispatch import LayerStacks, rank_routing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    cli = parser.parse_args()
    args = SimpleNamespace(**vars(cli), ep=1)

    from megatron_grouter.dispatch.plan import DispatchPlan
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    layout = init_distributed(expert_parallel=1, num_experts=args.experts)
    cuda = layout.device.type == "cuda"
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
    try:
        indices_TK = rank_routing(args, 0)
        stacks = LayerStacks(args, layout.device, indices_TK, torch.rand(args.tokens, args.topk))
        plan = DispatchPlan(stacks.host_routing.copies_E[None])  # EP=1: this rank's counts are the plan
        hidden_TBH = torch.randn(args.tokens, 1, args.hidden, device=layout.device)

        def step(name: str):
            layer = stacks.stack(name)  # same weights in every stack, same parameter order
            layer.zero_grad(set_to_none=True)
            inputs = hidden_TBH.clone().requires_grad_(True)
            output = stacks.forward(name, inputs, plan if name == "planned" else None)
            output.float().square().mean().backward()
            return output.detach(), inputs.grad, [p.grad.clone() for p in layer.parameters()]

        reference = step("allgather")
        for name in ("planned", "counted"):
            result = step(name)
            worst = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
                        for a, b in zip([result[0], result[1], *result[2]],
                                        [reference[0], reference[1], *reference[2]]))
            print(f"{name}: largest relative difference to allgather (output, input grad, "
                  f"expert grads) {worst:.2e}")
        if cuda:
            for name in ("planned", "counted", "allgather"):
                step(name)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    step(name)
                    verdict = "no device→host sync in forward+backward"
                except RuntimeError as error:
                    verdict = f"syncs: {str(error).splitlines()[0][:100]}"
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                print(f"{name}: {verdict}")
        times = {name: [] for name in ("planned", "counted", "allgather")}
        for iteration in range(3 + args.steps):
            for name in times:
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                step(name)
                if cuda:
                    torch.cuda.synchronize()
                if iteration >= 3:
                    times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(values) for name, values in times.items()}
        print(f"MoE layer fwd+bwd, EP=1, {args.tokens} tokens, hidden {args.hidden}, ffn {args.ffn}, "
              f"E={args.experts} top-{args.topk}, median of {args.steps}: " + ", ".join(
                  f"{name} {value * 1e3:.2f} ms" for name, value in medians.items()))
        print(f"ratios: allgather/planned {medians['allgather'] / medians['planned']:.3f}  "
              f"counted/planned {medians['counted'] / medians['planned']:.3f}")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
