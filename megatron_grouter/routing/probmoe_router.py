"""ProbMoE as a router for megatron-core's MoELayer (exact-k and dynamic-k).

Training: each token's expert subset is an exact sample of p(z) ~ exp(z . logits) restricted to
k_min <= |z| <= k_max; the gates are the straight-through weights (z + mu - stopgrad(mu)) times
softmax(logits), so the router learns through the exact marginals mu (see `probmoe_dp`).
Evaluation (or no grad): the most probable subset, same gates without the surrogate.

k_max is `moe_router_topk` (megatron sizes its buffers with it); k_min defaults to k_max
(exact-k). `moe_router_pre_softmax=False` renormalises the gates over the chosen experts (what
megatron's top-k softmax router gives), `True` keeps softmax over all experts (the official
ProbMoE formula). In training the router also meters the exact entropy of its subset
distribution (`probmoe_dp.subset_entropy`, logged per layer as moe/subset_entropy). z-loss, the aux losses (computed on megatron's own top-k scores) and token
dropping work as in TopKRouter; expert bias, sinkhorn and group-limited routing are refused.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_grouter.errors import UserError
from megatron_grouter.routing.metered_router import LoadMeter
from megatron_grouter.routing.probmoe_dp import (
    InferenceRule,
    most_probable_subset,
    sample_with_marginals,
    straight_through_gates,
    subset_entropy,
)

# Tokens per forward whose exact subset entropy is metered (a strided sample: its log-normaliser
# DP costs a pass of its own, and a mean over 512 tokens is precise enough for a log line).
ENTROPY_SAMPLE_TOKENS = 512


def _refuse_unsupported(config) -> None:
    if config.moe_router_enable_expert_bias:
        raise UserError("ProbMoE routing has no expert bias; set moe_router_enable_expert_bias=False")
    if config.moe_router_load_balancing_type == "sinkhorn":
        raise UserError("ProbMoE routing replaces sinkhorn; choose aux_loss, seq_aux_loss or none")
    if config.moe_router_num_groups:
        raise UserError("ProbMoE routing has no group-limited routing; unset moe_router_num_groups")
    if config.moe_router_score_function != "softmax":
        raise UserError("ProbMoE gates are softmax weights; set moe_router_score_function=softmax")


class ProbMoERouter(TopKRouter):
    """TopKRouter whose selection is ProbMoE sampling (training) / MAP subset (inference)."""

    def __init__(self, config, pg_collection=None, *, k_min: int | None = None,
                 inference_rule: InferenceRule = "map", generator: torch.Generator | None = None):
        _refuse_unsupported(config)
        super().__init__(config=config, pg_collection=pg_collection)
        self.k_max = config.moe_router_topk
        self.k_min = self.k_max if k_min is None else k_min
        if not 1 <= self.k_min <= self.k_max <= self.num_experts:
            raise UserError(f"ProbMoE needs 1 <= k_min <= topk <= num_experts, got k_min={self.k_min}, "
                            f"topk={self.k_max}, num_experts={self.num_experts}; fix router k_min/topk")
        self.renormalise = not config.moe_router_pre_softmax
        self.inference_rule = inference_rule
        # None: torch's default generator, which megatron seeds alike on the ranks of a TP group
        self.generator = generator
        self.load_meter = LoadMeter(self.num_experts)

    def select(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(gates_TE, routing_map_TE, marginals_TE or None outside training) for flat logits."""
        if self.training and torch.is_grad_enabled():
            mask_TE, mu_TE = sample_with_marginals(logits_TE, self.k_min, self.k_max, generator=self.generator)
        else:
            mask_TE = most_probable_subset(logits_TE, self.k_min, self.k_max, rule=self.inference_rule)
            mu_TE = None
        gates_TE = straight_through_gates(logits_TE, mask_TE, mu_TE, renormalise=self.renormalise)
        scaling = self.config.moe_router_topk_scaling_factor
        if scaling:
            gates_TE = gates_TE * scaling
        return gates_TE.to(logits_TE.dtype), mask_TE, mu_TE

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        seq_length, bsz = logits.shape[:2]
        logits_TE = logits.view(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_mask)
        probs_TE, routing_map_TE, mu_TE = self.select(logits_TE)

        if self.config.moe_expert_capacity_factor is not None:
            probs_TE, routing_map_TE = apply_router_token_dropping(
                probs_TE, routing_map_TE, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            with_padding = padding_mask is not None
            aux_map_TE, aux_scores_TE = compute_routing_scores_for_aux_loss(
                logits_TE, self.topk, self.score_function, fused=self.config.moe_router_fusion,
                padding_mask=padding_mask,
            )
            probs_TE = self._apply_aux_loss(probs_TE, aux_scores_TE, aux_map_TE, with_padding_mask=with_padding)
            probs_TE = self._apply_seq_aux_loss(probs_TE, aux_scores_TE, aux_map_TE, seq_length, bsz,
                                                with_padding_mask=with_padding)
            probs_TE = self._apply_global_aux_loss(probs_TE, aux_scores_TE, aux_map_TE,
                                                   with_padding_mask=with_padding)

        self.load_meter.record(routing_map_TE)
        if mu_TE is not None:  # training: the sampling step's marginals leave only log Z to compute
            stride = max(1, logits_TE.shape[0] // ENTROPY_SAMPLE_TOKENS)
            self.load_meter.record_entropy(subset_entropy(logits_TE.detach()[::stride].float(),
                                                          self.k_min, self.k_max, mu_TE[::stride]))
        return probs_TE, routing_map_TE
