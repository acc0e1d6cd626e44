"""megatron-core's TopKRouter, counting how many tokens it sends to each expert.

Every router of this project exposes `tokens_per_expert_E`: a float buffer that accumulates
the tokens routed to each expert (this rank's tokens) since the trainer last read it. Load
statistics (MaxVioGlobal, per-layer load) are then logged the same way for every router.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter


class LoadMeter(torch.nn.Module):
    """Accumulates the tokens routed to each expert (and, for routers that report one, the
    per-token routing entropy); not part of the state dict."""

    def __init__(self, num_experts: int, entropy_metric: str = "subset_entropy"):
        super().__init__()
        self.entropy_metric = entropy_metric  # logged as moe/<entropy_metric>
        self.register_buffer("tokens_per_expert_E", torch.zeros(num_experts), persistent=False)
        self.register_buffer("entropy_sum_tokens", torch.zeros(2, dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def record_entropy(self, entropy_T: torch.Tensor) -> None:
        self.entropy_sum_tokens[0] += entropy_T.double().sum()
        self.entropy_sum_tokens[1] += entropy_T.numel()  # a Python number: no host→device copy

    def take_entropy(self) -> torch.Tensor:
        """[entropy sum, tokens] since the last call (zeros if the router reports none)."""
        value = self.entropy_sum_tokens.clone()
        self.entropy_sum_tokens.zero_()
        return value

    @torch.no_grad()
    def record(self, routing_map_TE: torch.Tensor) -> None:
        self.tokens_per_expert_E += routing_map_TE.sum(dim=0).to(self.tokens_per_expert_E.dtype)

    def take(self) -> torch.Tensor:
        counts_E = self.tokens_per_expert_E.clone()
        self.tokens_per_expert_E.zero_()
        return counts_E


class MeteredTopKRouter(TopKRouter):
    """TopKRouter (aux loss, seq aux loss, sinkhorn, z-loss, expert bias) plus a load meter."""

    def __init__(self, config, pg_collection=None, **megatron_kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **megatron_kwargs)
        self.load_meter = LoadMeter(config.num_moe_experts)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs_TE, routing_map_TE = super().routing(logits, padding_mask=padding_mask)
        self.load_meter.record(routing_map_TE)
        return probs_TE, routing_map_TE
