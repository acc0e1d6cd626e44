"""Differentiable all-to-all with uneven splits: the backward sends gradients back the same way."""

from __future__ import annotations

import torch
import torch.distributed as dist


def exchange_rows(rows: torch.Tensor, output_splits: list[int], input_splits: list[int],
                  group) -> torch.Tensor:
    """Send rows[sum(input_splits[:p]) : ...] to EP peer p; receive output_splits[p] rows from p."""
    if group is None or group.size() == 1:
        return rows
    return _AllToAll.apply(rows, output_splits, input_splits, group)


def _all_to_all(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group):
    received = rows.new_empty((sum(output_splits), *rows.shape[1:]))
    dist.all_to_all_single(received, rows.contiguous(), output_split_sizes=output_splits,
                           input_split_sizes=input_splits, group=group)
    return received


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(rows, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_received):
        grad_rows = _all_to_all(grad_received, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_rows, None, None, None
