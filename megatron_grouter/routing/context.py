"""The routing of the current micro-batch, handed explicitly to the MoE layers' routers.

megatron's MoELayer calls `router(hidden_states, padding_mask)` with hidden states only. A
preemptive router needs the experts and gate weights that the Grouter (online) or the routing
cache (offline) chose for *these* tokens. A `RoutingContext` is created with the model, given to
every preemptive router at construction, filled by the trainer before each forward and cleared
after it — no global registry, no hooks.

Token order: megatron's decoder is sequence-first, [s, b, h], and the router flattens it to
s·b tokens (token t = s_index·b + b_index). With sequence parallelism each tensor-parallel rank
holds the s-slice [rank·s/tp, (rank+1)·s/tp); `local()` hands out exactly that slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grouter.errors import UserError


@dataclass
class Routing:
    """Top-k experts (Grouter expert ids) and gate weights, sequence-first: [s, b, k]."""

    indices_SBK: torch.Tensor
    weights_SBK: torch.Tensor

    @staticmethod
    def from_batch_first(indices_BSK: torch.Tensor, weights_BSK: torch.Tensor) -> "Routing":
        return Routing(indices_BSK.transpose(0, 1).contiguous(), weights_BSK.transpose(0, 1).contiguous())


class RoutingContext:
    def __init__(self, sequence_parallel: bool = False):
        self.sequence_parallel = sequence_parallel
        self._routing: Routing | None = None

    def set(self, routing: Routing) -> None:
        self._routing = routing

    def clear(self) -> None:
        self._routing = None

    @property
    def is_set(self) -> bool:
        return self._routing is not None

    def local(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's [num_tokens, k] indices and weights, in the router's token order."""
        if self._routing is None:
            raise UserError("a preemptive router ran without routing for its batch; run the model "
                            "through the trainer (which sets the RoutingContext) or set it yourself")
        indices_SBK, weights_SBK = self._routing.indices_SBK, self._routing.weights_SBK
        seq, batch, topk = indices_SBK.shape
        if self.sequence_parallel:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            chunk = seq // tp_size
            indices_SBK = indices_SBK[tp_rank * chunk:(tp_rank + 1) * chunk]
            weights_SBK = weights_SBK[tp_rank * chunk:(tp_rank + 1) * chunk]
        if indices_SBK.shape[0] * batch != num_tokens:
            raise RuntimeError(f"routing for {indices_SBK.shape[0] * batch} tokens but the MoE layer "
                               f"has {num_tokens}; the RoutingContext is out of step with the batch")
        return indices_SBK.reshape(num_tokens, topk), weights_SBK.reshape(num_tokens, topk)
