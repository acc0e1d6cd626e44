"""Where the MoE layers find the routing of the micro-batch they are running.

megatron's GPTModel.forward takes token ids, positions and a mask; nothing else reaches the MoE
layers. The routing of a micro-batch is data of that micro-batch (`MicroBatch.routing`, computed
by `routing.microbatch.route_micro_batch` when the batch is made), so the forward step hands it
to the layers for the duration of that one forward:

    with context.serving(batch.routing):
        output = model(...)

A `RoutingContext` is created with the model and given to every preemptive router and planned
dispatcher at construction; `serving` is its only writer. Outside a forward it is empty, so
routing cannot leak from one micro-batch into the next (under 1F1B the forward of i+1 runs
before the backward of i; backward needs no routing: it is a constant of the autograd graph).

Token order: megatron's decoder is sequence-first, [s, b, h], and the router flattens it to
s·b tokens (token t = s_index·b + b_index). With sequence parallelism each tensor-parallel rank
holds the s-slice [rank·s/tp, (rank+1)·s/tp); `local()` hands out exactly that slice.
"""

from __future__ import annotations

import contextlib

from megatron_grouter.errors import UserError
from megatron_grouter.routing.microbatch import MicroBatchRouting, RoutedTokens


class RoutingContext:
    def __init__(self, sequence_parallel: bool = False):
        self.sequence_parallel = sequence_parallel
        self._routing: MicroBatchRouting | None = None

    @contextlib.contextmanager
    def serving(self, routing: MicroBatchRouting | None):
        """The layers see `routing` inside the block (None: learned routing, nothing to serve)."""
        if self._routing is not None:
            raise RuntimeError("a forward started inside another forward's routing")
        self._routing = routing
        try:
            yield
        finally:
            self._routing = None

    @property
    def routing(self) -> MicroBatchRouting | None:
        return self._routing

    @property
    def plan(self):
        """The dispatch plan of the micro-batch being run, or None."""
        return None if self._routing is None else self._routing.plan

    def local(self, num_tokens: int) -> RoutedTokens:
        """This rank's routing, [num_tokens, k], in the router's token order."""
        if self._routing is None:
            raise UserError("a preemptive router ran without routing for its batch; run the model "
                            "through the trainer's forward step (which hands each micro-batch's "
                            "routing to the layers) or use RoutingContext.serving yourself")
        tokens = self._routing.tokens_SBK
        seq, batch, topk = tokens.slots.shape
        parts = (tokens.slots, tokens.weights, tokens.routed)
        if self.sequence_parallel:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            chunk = seq // tp_size
            parts = tuple(part[tp_rank * chunk:(tp_rank + 1) * chunk] for part in parts)
        if parts[0].shape[0] * batch != num_tokens:
            raise RuntimeError(f"routing for {parts[0].shape[0] * batch} tokens but the MoE layer "
                               f"has {num_tokens}; the routing is out of step with the batch")
        return RoutedTokens(*(part.reshape(num_tokens, topk) for part in parts))
