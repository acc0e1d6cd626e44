"""ProbMoE (arXiv 2606.01509) as a router for megatron-core's MoELayer (exact-k and dynamic-k).

A TopKRouter subclass plugged in through the layer spec like any router: it returns megatron's
(probs [T, E], routing_map [T, E]) and megatron's dispatcher, experts and aux-loss machinery do
the rest. k_max is `moe_router_topk` (megatron sizes its buffers with it); k_min defaults to
k_max (exact-k). The DP is the product tree of `probmoe_tree` (one pass gives the sample, the
marginals, log Z and the entropy; no host synchronisation).

What we do and why, against the official code (HengHugoZhao/ProbMoE, v1 and v2 OLMoE blocks,
which fine-tune pretrained OLMoE / Qwen1.5-MoE) and the paper:

- Subset distribution: p(z) ~ exp(z . l / temperature), k_min <= |z| <= k_max. The official
  code's independent Bernoulli(sigmoid(l)) conditioned on the count is the same distribution at
  temperature 1 (prod (1 + e^l) is a per-token constant). Training routes each token to an exact
  sample of it.
- Surrogate gradient: as official, g = z + mu - stopgrad(mu) with the exact marginals mu (the
  SIMPLE estimator): forward value z, backward d mu / d l = Cov(z) / temperature. The official
  optional marginal smoothing (0.99 mu + 0.01 sigmoid, "use_gradient_clipping", off by default)
  is not offered.
- Gate weights: official is w = g * softmax(l) over all experts, not renormalised over the
  chosen ones (OLMoE norm_topk_prob=False); here `moe_router_pre_softmax=True`. Default (chosen by
  measurement, deviation): renormalised over the chosen experts (`pre_softmax=False`, as
  megatron's top-k softmax router). With renormalisation the output does not depend on the scale
  of g on the selected experts, so dL/dg sums to 0 over them (and is 0 elsewhere: the sparse
  layer never computes unselected experts): the router learns which selected expert beats which,
  and Cov(z) spreads that to every logit. Measured (micro model, E=8 k=2, 120 steps, seed 1234):
  val 5.930 renormalised vs 6.074 official at temperature 1, 5.846 vs 5.889 at 0.1 (the
  official form shrinks the expert output to ~k/E of its scale at init).
- Temperature: the official code has none: it fine-tunes routers whose logits are already sharp.
  Pretraining from scratch starts from logits with std ~0.2, where exp(z . l) is close to
  uniform over all C(E, k) subsets (measured: subset entropy within 1% of log C(E, k) for the
  whole run), so training routes almost at random while evaluation takes the top-k. Our choice,
  by measurement (see the module's test and benchmarks/probmoe_convergence.py): a fixed
  `temperature` (default 0.05 in the probmoe configs) on the selection distribution only; the
  gates keep softmax(l) at temperature 1 as official. It sharpens sampling at init (std 0.2 ->
  4) and scales the surrogate gradient by 1 / temperature. No schedule (the router does not know
  the step). Measured (micro, 120 steps, val; entropy after 100 steps of max 3.33): temperature 1:
  5.930 (3.25); 0.1: 5.846 / seed 2 6.034 (1.07); 0.05: 5.854 / 5.968 (0.63); 0.02: 5.828 (0.16);
  aux_loss top-k 5.816 / 5.980.
- Balance loss: the official fine-tuning runs use none (load_balancing_loss False; had it been
  on, HF's OLMoE loss recomputes a deterministic top-k from the logits). Pretraining needs one,
  so megatron's aux / seq-aux / global-aux losses are applied with megatron's softmax scores but
  with the routing map of the *sampled* subsets, the experts the tokens are really sent to (not
  megatron's deterministic top-k of the scores, which differs from the sample in training).
- Evaluation (and any forward without grad): the most probable subset, as official (exact-k:
  top-k; dynamic-k: the official argmax of the sorted cumulative sum = the positive logits,
  clamped to [k_min, k_max]); the temperature does not change it. Gates without the surrogate.
- Metering: the entropy of the subset distribution of every token and the routed counts come
  from the same tree pass (no second DP), logged as moe/subset_entropy and moe/active_experts.
- Dynamic-k size (deviation, opt-in): the official code has no price on the number of experts;
  it fine-tunes pretrained routers whose logits already make small subsets likely, and it still
  computes k_max experts per token (zero gates for the unpicked). Here only the sampled experts
  are computed, and from scratch nothing asks for fewer: softmax gates are shift-invariant and
  renormalised gates make the surrogate gradient sum to 0 over the chosen experts, so the size
  drifts to k_max (measured: 2.00 of 2 on tiny_cpu). `count_cost` > 0 adds count_cost * E|z|
  (E|z| = sum_i mu_i, exact from the tree; gradient Cov(z) 1 / temperature) through megatron's
  aux-loss scaler, logged as probmoe_expected_experts. Default 0 (the paper's model).

z-loss and token dropping work as in TopKRouter; expert bias, sinkhorn and group-limited routing
are refused.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping
from megatron.core.transformer.moe.router import TopKRouter

from megatron_grouter.errors import UserError
from megatron_grouter.routing.metered_router import LoadMeter
from megatron_grouter.routing.probmoe_dp import InferenceRule, most_probable_subset, straight_through_gates
from megatron_grouter.routing.probmoe_tree import route


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
                 inference_rule: InferenceRule = "map", temperature: float = 1.0, count_cost: float = 0.0,
                 generator: torch.Generator | None = None, **megatron_kwargs):
        _refuse_unsupported(config)
        super().__init__(config=config, pg_collection=pg_collection, **megatron_kwargs)
        self.k_max = config.moe_router_topk
        self.k_min = self.k_max if k_min is None else k_min
        if not 1 <= self.k_min <= self.k_max <= self.num_experts:
            raise UserError(f"ProbMoE needs 1 <= k_min <= topk <= num_experts, got k_min={self.k_min}, "
                            f"topk={self.k_max}, num_experts={self.num_experts}; fix router k_min/topk")
        if not temperature > 0:
            raise UserError(f"ProbMoE temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        if not count_cost >= 0:
            raise UserError(f"ProbMoE count_cost must be >= 0, got {count_cost}")
        if count_cost > 0 and self.k_min == self.k_max:
            raise UserError(f"ProbMoE count_cost prices a variable number of experts, but exact-k routes "
                            f"exactly {self.k_max}; set router.probmoe.k_min below topk or count_cost=0")
        self.count_cost = float(count_cost)
        self.renormalise = not config.moe_router_pre_softmax
        self.inference_rule = inference_rule
        # None: torch's default generator, which megatron seeds alike on the ranks of a TP group
        self.generator = generator
        self.load_meter = LoadMeter(self.num_experts)

    def select(self, logits_TE: torch.Tensor):
        """(gates_TE, routing_map_TE, entropy_T, mu_TE) for flat logits (the last two None outside
        training)."""
        if self.training and torch.is_grad_enabled():
            result = route(logits_TE / self.temperature, self.k_min, self.k_max, sample=True,
                           generator=self.generator)
            mask_TE, mu_TE, entropy_T = result.mask_TE, result.mu_TE, result.entropy_T
        else:
            mask_TE = most_probable_subset(logits_TE, self.k_min, self.k_max, rule=self.inference_rule)
            mu_TE = entropy_T = None
        gates_TE = straight_through_gates(logits_TE, mask_TE, mu_TE, renormalise=self.renormalise)
        scaling = self.config.moe_router_topk_scaling_factor
        if scaling:
            gates_TE = gates_TE * scaling
        return gates_TE.to(logits_TE.dtype), mask_TE, entropy_T, mu_TE

    def _apply_count_cost(self, probs_TE, mu_TE, padding_mask):
        """count_cost * E|z| (mean over valid tokens of sum_i mu_i), through megatron's aux-loss
        machinery (gradient scaling, logging as probmoe_expected_experts). Its gradient
        count_cost * Cov(z) 1 / temperature lowers every logit in proportion to how much it adds
        to the expected size: the only force on the size besides the LM loss."""
        active_T = mu_TE.sum(dim=1)
        if padding_mask is not None:
            valid_T = ~padding_mask
            valid_tokens = valid_T.sum()
            mean_active = (active_T * valid_T).sum() / valid_tokens.clamp_min(1)
        else:
            valid_tokens, mean_active = active_T.shape[0], active_T.mean()
        return self.attach_and_log_load_balancing_loss(
            probs_TE, self.count_cost, self.count_cost * mean_active, "probmoe_expected_experts",
            self.tp_cp_group, valid_token_count=valid_tokens)

    def _apply_balance_losses(self, probs_TE, logits_TE, routing_map_TE, padding_mask, seq_length, bsz):
        """megatron's aux losses on the sampled routing map (see the module docstring)."""
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        aux_map_TE = routing_map_TE
        if padding_mask is not None:
            valid_T1 = (~padding_mask).unsqueeze(-1)
            aux_map_TE, scores_TE = routing_map_TE & valid_T1, scores_TE * valid_T1
        with_padding = padding_mask is not None
        probs_TE = self._apply_aux_loss(probs_TE, scores_TE, aux_map_TE, with_padding_mask=with_padding)
        probs_TE = self._apply_seq_aux_loss(probs_TE, scores_TE, aux_map_TE, seq_length, bsz,
                                            with_padding_mask=with_padding)
        return self._apply_global_aux_loss(probs_TE, scores_TE, aux_map_TE, with_padding_mask=with_padding)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        seq_length, bsz = logits.shape[:2]
        logits_TE = logits.view(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_mask)
        probs_TE, routing_map_TE, entropy_T, mu_TE = self.select(logits_TE)
        if self.count_cost and mu_TE is not None:
            probs_TE = self._apply_count_cost(probs_TE, mu_TE, padding_mask)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            probs_TE = self._apply_balance_losses(probs_TE, logits_TE, routing_map_TE, padding_mask,
                                                  seq_length, bsz)

        if self.config.moe_expert_capacity_factor is not None:
            probs_TE, routing_map_TE = apply_router_token_dropping(
                probs_TE, routing_map_TE, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        self.load_meter.record(routing_map_TE)
        if entropy_T is not None:  # training: the tree pass already computed every token's entropy
            self.load_meter.record_entropy(entropy_T.detach())
        return probs_TE, routing_map_TE
