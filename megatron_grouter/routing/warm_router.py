"""A learned router warm-started from preemptive routing (the issue-25 transfer control).

`WarmStartRouter` is megatron-core's TopKRouter (its own top-k, its load-balancing loss) that, for
the first `warm_tokens` training tokens it routes, follows the routing served for the micro-batch
(the frozen Grouter's experts) instead of its own top-k and learns to imitate it: its gate is the
softmax of its logits over the served experts (as in HybridRouter), and a cross-entropy of its
softmax over all experts toward the served experts (weight `imitation_coeff`) reaches its weights
through megatron's aux-loss scaler. After that it routes by its own top-k and trains as any learned
router: routing knowledge transferred from the Grouter, nothing frozen.

The count is this rank's training tokens (each data-parallel rank counts its own share) and lives
in the module (not in checkpoints): a resumed run starts its warm phase again.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_grouter.errors import UserError
from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.routing.metered_router import MeteredTopKRouter
from megatron_grouter.routing.preemptive_router import dense_routing


def imitation_loss(logits_TE: torch.Tensor, slots_TK: torch.Tensor, routed_TK: torch.Tensor) -> torch.Tensor:
    """Mean over routed (token, slot) pairs of −log softmax(logits)[slot]."""
    log_probs_TK = torch.log_softmax(logits_TE.float(), dim=-1).gather(1, slots_TK)
    weights_TK = routed_TK.float()
    return -(log_probs_TK * weights_TK).sum() / weights_TK.sum().clamp_min(1.0)


class WarmStartRouter(MeteredTopKRouter):
    def __init__(self, config, pg_collection=None, *, context: RoutingContext, warm_tokens: int,
                 imitation_coeff: float, **megatron_kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **megatron_kwargs)
        if warm_tokens < 1:
            raise UserError(f"router.grouter.warm_tokens={warm_tokens}; a warm-started router needs a positive "
                            "number of training tokens to follow the Grouter (e.g. 102400)")
        self.context = context
        self.warm_tokens = int(warm_tokens)
        self.imitation_coeff = float(imitation_coeff)
        self.tokens_routed = 0  # training tokens this router has routed so far

    @property
    def warm(self) -> bool:
        return self.tokens_routed < self.warm_tokens

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if not self.warm:
            return super().routing(logits, padding_mask=padding_mask)
        logits_TE = logits.view(-1, self.num_experts)
        tokens = self.context.local(logits_TE.shape[0]).to(logits_TE.device)
        if self.training:
            self.tokens_routed += logits_TE.shape[0]
        gates_TK = torch.softmax(logits_TE.gather(1, tokens.slots).float(), dim=-1)
        probs_TE, routing_map_TE = dense_routing(tokens.slots, gates_TK.to(logits_TE.dtype), tokens.routed,
                                                 self.num_experts)
        if self.training and self.imitation_coeff > 0 and torch.is_grad_enabled():
            loss = self.imitation_coeff * imitation_loss(logits_TE, tokens.slots, tokens.routed)
            probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, loss)
        self.load_meter.record(routing_map_TE)
        return probs_TE, routing_map_TE
