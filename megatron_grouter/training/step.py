"""One global batch through megatron-core's pipeline schedules.

`get_forward_backward_func()` picks megatron's schedule for the layout: no pipelining (PP=1),
1F1B (PP>1), or interleaved 1F1B (`parallel.virtual_pipeline`). The schedule calls our
`forward_step` once per micro-batch and model chunk, in its own order: under 1F1B a stage runs
the forward of micro-batch i+1 before the backward of i. So everything a micro-batch needs
besides its tokens — preemptive routing and its dispatch plan — travels with the micro-batch
(`MicroBatch.routing`, attached before the schedule runs) and forward_step hands it to the MoE
layers for that one forward (`RoutingContext.serving`); backward needs no routing (it is a
constant of the autograd graph and the planned dispatcher keeps its split sizes in the graph).

Every stage iterates the same micro-batches (non-first stages need their token positions and
sample ids to find the routing; their input activations come from the previous stage).
The loss lives on the last stage; `forward_backward` returns it summed there, zero elsewhere.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_grouter.training.batches import MicroBatch
from megatron_grouter.training.device_batches import on_device


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s], True where attention is masked (megatron's convention)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[None, None]


def masked_mean_loss(loss_mask_BS: torch.Tensor, token_loss_BS: torch.Tensor):
    """megatron's loss_func contract: (loss to back-propagate, values to report). The schedule
    divides the loss by the number of micro-batches in place, so the reported value is a copy.
    Reported values stay on the device (no host sync per micro-batch)."""
    loss = (token_loss_BS.float() * loss_mask_BS).sum() / loss_mask_BS.sum()
    return loss, {"loss": loss.detach().clone()}


class ForwardStep:
    """megatron's forward_step_func: (data_iterator, model chunk) → (output, loss_func)."""

    def __init__(self, routing_context, device: torch.device, seq_length: int):
        self.routing_context = routing_context
        self.device = device
        self.mask = causal_mask(seq_length, device)

    def __call__(self, data_iterator, model):
        batch: MicroBatch = on_device(next(data_iterator), self.device)
        with self.routing_context.serving(batch.routing):
            output = model(batch.tokens_BS, batch.position_ids_BS, self.mask, labels=batch.labels_BS)
        return output, functools.partial(masked_mean_loss, batch.loss_mask_BS)


def forward_backward(forward_step: ForwardStep, model_chunks: list, batches: list[MicroBatch],
                     seq_length: int, micro_batch_size: int, forward_only: bool) -> torch.Tensor:
    """Run the schedule over `batches`; the sum of the micro-batch losses on the last stage
    (a device tensor, zero on other stages)."""
    iterators = [iter(batches) for _ in model_chunks]
    schedule = get_forward_backward_func()
    reported = schedule(forward_step_func=forward_step,
                        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
                        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
                        num_microbatches=len(batches), seq_length=seq_length,
                        micro_batch_size=micro_batch_size, forward_only=forward_only)
    if not reported:
        return torch.zeros((), dtype=torch.float32, device=forward_step.device)
    return torch.stack([item["loss"] for item in reported]).sum()
