"""Training-step statistics without a host sync per step.

What a step's metrics need from other ranks (the loss, MoE loads, auxiliary losses, routing
entropy, expert-bias movement, EP traffic) stays on the device as this rank's sums, one flat
vector per step. At a log step — and before an evaluation, a checkpoint or the end of the run —
`flush` sums the window's vectors over every rank in one all-reduce and copies them to the host
once; each step's metrics are then computed from its global sums. Values the host already has
(learning rate, the gradient norm megatron's optimizer returns) ride along as they are.

One all-reduce over the whole world is enough because every part is a sum over ranks holding
different tokens: data-, expert- and pipeline-parallel ranks, and tensor-parallel ranks under
sequence parallelism (each routes its own slice of the sequence). A part that tensor-parallel
ranks hold as copies (the loss, traffic observed from the whole micro-batch) is added by
tensor-parallel rank 0 alone.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


class StepStatistics:
    def __init__(self, summarise: Callable[[dict[str, torch.Tensor]], dict], device: torch.device,
                 tensor_parallel_rank: int = 0):
        """`summarise(global sums by name) -> metrics` of one step, on the host; `device`: where
        the sums are reduced (the GPU under NCCL)."""
        self.summarise = summarise
        self.device = device
        self.tensor_parallel_rank = tensor_parallel_rank
        self.window: list[tuple[int, dict, torch.Tensor]] = []
        self.shapes: dict[str, torch.Size] | None = None

    def add(self, step: int, host_metrics: dict, sums: dict[str, torch.Tensor],
            tensor_parallel_copies: tuple[str, ...] = ()) -> None:
        """Keep this rank's `sums` of `step` (the same names and shapes on every rank and every
        step; host parts are copied to the device without blocking) until the next flush."""
        names = sorted(sums)
        shapes = {name: sums[name].shape for name in names}
        if self.shapes is not None and shapes != self.shapes:
            raise RuntimeError(f"step statistics changed shape: {shapes} after {self.shapes}")
        self.shapes = shapes
        parts = [torch.zeros_like(sums[name]) if name in tensor_parallel_copies and self.tensor_parallel_rank
                 else sums[name] for name in names]
        flat = (torch.cat([part.to(self.device, torch.float64, non_blocking=True).reshape(-1) for part in parts])
                if parts else torch.zeros(0, dtype=torch.float64, device=self.device))
        self.window.append((step, host_metrics, flat))

    def __len__(self) -> int:
        return len(self.window)

    def flush(self) -> list[tuple[int, dict]]:
        """(step, metrics) of every step kept since the last flush, in order; one all-reduce and
        one device→host copy for all of them."""
        if not self.window:
            return []
        table = torch.stack([flat for _, _, flat in self.window])
        if dist.is_initialized() and table.numel():
            dist.all_reduce(table)
        table = table.cpu()
        records = []
        for (step, host_metrics, _), row in zip(self.window, table):
            sums, offset = {}, 0
            for name, shape in self.shapes.items():
                size = shape.numel()
                sums[name] = row[offset:offset + size].view(shape)
                offset += size
            records.append((step, {**host_metrics, **self.summarise(sums)}))
        self.window = []
        return records
