"""A megatron-core token dispatcher whose all-to-all split sizes come from a host-side plan.

Path of one MoE layer (EP ranks p, local experts l, L per rank):
  permute tokens by expert slot → all_to_all over the EP group (splits from the plan) →
  regroup the received chunks from [source rank, local expert] to [local expert, source rank] →
  megatron's experts → the same steps backwards.
Within each expert the tokens arrive in the order megatron's allgather dispatcher gives them
(source rank, then token index), so both compute the same expert inputs.

Tensor parallelism: with expert tensor parallel size 1 megatron folds the TP ranks into the
EP/expert-DP grid, and under sequence parallelism each TP rank's layer input is its own slice
of the sequence; like megatron's all-to-all dispatcher at ETP=1, each rank dispatches its own
tokens over the EP group (no gather over TP). Expert tensor parallel size > 1 is refused.

It enters megatron through our layer spec: `training/moe_layer.py`'s PluginMoELayer (the spec's
layer class) builds it in its constructor, with the layer's own process groups. The plan of the
running micro-batch is part of that micro-batch's routing (`MicroBatchRouting.plan`, read
through the RoutingContext the forward step fills). With a plan there is no count collective and no device→host sync: the
split sizes and the tokens per local expert are host integers, and tokens are permuted with a
stable sort whose output length is known in advance (a masked_select would sync). Without a plan
the dispatcher all-gathers its counts over the EP group and copies them to the host, once per
layer, like megatron's own all-to-all dispatcher: `dispatcher=planned` works with any router.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import utils
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import permute, unpermute
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_grouter.dispatch.exchange import exchange_rows
from megatron_grouter.dispatch.plan import DispatchPlan, DispatchPlanMismatch, RankSplits
from megatron_grouter.errors import UserError
from megatron_grouter.routing.context import RoutingContext

# torch ≥ 2.11 renamed all_gather_into_tensor (the old name warns).
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def permute_by_expert(tokens_TH: torch.Tensor, routing_map_TE: torch.Tensor, probs_TE: torch.Tensor,
                      num_routed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token copies grouped by expert (token order within an expert), their probs and token ids.

    The same order as megatron's `permute`, without its data-dependent masked_select.
    """
    num_tokens = routing_map_TE.shape[0]
    not_routed_ET = routing_map_TE.T.reshape(-1).logical_not().to(torch.uint8)
    routed_flat_N = torch.sort(not_routed_ET, stable=True).indices[:num_routed]
    token_ids_N = routed_flat_N % num_tokens
    probs_N = probs_TE.T.reshape(-1).index_select(0, routed_flat_N)
    return tokens_TH.index_select(0, token_ids_N), probs_N, token_ids_N


def chunk_order(num_sources: int, num_local_experts: int) -> tuple[list[int], list[int]]:
    """Chunk indices that regroup [source, expert] → [expert, source], and back."""
    by_expert = [source * num_local_experts + expert for expert in range(num_local_experts)
                 for source in range(num_sources)]
    by_source = [expert * num_sources + source for source in range(num_sources)
                 for expert in range(num_local_experts)]
    return by_expert, by_source


def reorder_chunks(rows: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    chunks = torch.split(rows, sizes)
    return torch.cat([chunks[index] for index in order])


class PlannedAllToAllDispatcher(MoETokenDispatcher):
    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config,
                 pg_collection: ProcessGroupCollection, *, context: RoutingContext, verify: bool = False):
        super().__init__(config=config, pg_collection=pg_collection)
        # megatron's base class reads the expert-TP group as `tp_group`: with expert tensor parallel
        # size 1 (any TP), each rank dispatches its own (sequence-parallel) tokens over the EP group
        if self.tp_size > 1:
            raise UserError(f"the planned dispatcher keeps experts whole but expert tensor parallel size is "
                            f"{self.tp_size}; set parallel.expert_tensor=1 or use parallel.dispatcher=alltoall")
        self.context = context
        # debug mode: every layer compares the plan with its router's routing (one host copy)
        self.verify = verify
        self.num_experts = config.num_moe_experts
        self.num_local_experts = num_local_experts
        self.ep_rank = utils.get_pg_rank(self.ep_group)
        expected = list(range(self.ep_rank * num_local_experts, (self.ep_rank + 1) * num_local_experts))
        if list(local_expert_indices) != expected:
            raise ValueError(f"local experts {local_expert_indices} are not slots {expected} of EP "
                             f"rank {self.ep_rank}")
        self.to_expert_major, self.to_source_major = chunk_order(self.ep_size, num_local_experts)

    # --------------------------------------------------------------- dispatch
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        tokens_TH = hidden_states.reshape(-1, self.hidden_shape[-1])
        self.splits = self.rank_splits(routing_map)
        num_routed = sum(self.splits.input_splits)
        if self.config.moe_permute_fusion:
            permuted_NH, probs_N, self.token_ids_N = permute(
                tokens_TH, routing_map, probs=probs, num_out_tokens=num_routed, fused=True)
        else:
            permuted_NH, probs_N, self.token_ids_N = permute_by_expert(tokens_TH, routing_map,
                                                                       probs, num_routed)
        return permuted_NH, probs_N

    def rank_splits(self, routing_map_TE: torch.Tensor) -> RankSplits:
        plan = self.context.plan
        if plan is None:
            return self.counted_plan(routing_map_TE).for_rank(self.ep_rank)
        if plan.tokens_per_expert_RE.shape != (self.ep_size, self.num_experts):
            raise DispatchPlanMismatch(f"dispatch plan is {tuple(plan.tokens_per_expert_RE.shape)} "
                                       f"but this layer needs [EP={self.ep_size}, E={self.num_experts}]")
        if self.verify:
            routed_E = routing_map_TE.sum(0).cpu()
            planned_E = plan.tokens_per_expert_RE[self.ep_rank]
            if not torch.equal(routed_E, planned_E):
                raise DispatchPlanMismatch(
                    f"EP rank {self.ep_rank}: the dispatch plan has {planned_E.tolist()} tokens per "
                    f"expert but the router chose {routed_E.tolist()}; the plan is out of step with "
                    "the routing")
        return plan.for_rank(self.ep_rank)

    def counted_plan(self, routing_map_TE: torch.Tensor) -> DispatchPlan:
        """The plan from this layer's routing: all-gather every rank's counts, one host copy."""
        counts_E = routing_map_TE.sum(0).long()
        if self.ep_size == 1:
            return DispatchPlan(counts_E[None].cpu())
        counts_RE = counts_E.new_empty(self.ep_size * self.num_experts)
        all_gather_single(counts_RE, counts_E, group=self.ep_group)
        return DispatchPlan(counts_RE.view(self.ep_size, self.num_experts).cpu())

    def token_dispatch(self, hidden_states, probs):
        splits = self.splits
        received_NH = exchange_rows(hidden_states, splits.output_splits, splits.input_splits,
                                    self.ep_group)
        received_probs_N = exchange_rows(probs, splits.output_splits, splits.input_splits,
                                         self.ep_group)
        return received_NH, received_probs_N

    def dispatch_postprocess(self, hidden_states, probs):
        splits = self.splits
        if self.num_local_experts > 1:
            sizes = splits.received_per_source_and_expert
            hidden_states = reorder_chunks(hidden_states, sizes, self.to_expert_major)
            probs = reorder_chunks(probs, sizes, self.to_expert_major)
        return hidden_states, splits.tokens_per_local_expert, probs

    # --------------------------------------------------------------- combine
    def combine_preprocess(self, hidden_states):
        if self.num_local_experts > 1:
            sizes = self.splits.received_per_source_and_expert
            expert_major_sizes = [sizes[index] for index in self.to_expert_major]
            hidden_states = reorder_chunks(hidden_states, expert_major_sizes, self.to_source_major)
        return hidden_states

    def token_combine(self, hidden_states):
        return exchange_rows(hidden_states, self.splits.input_splits, self.splits.output_splits,
                             self.ep_group)

    def combine_postprocess(self, hidden_states):
        num_tokens = self.hidden_shape[:-1].numel()
        tokens_TH = unpermute(hidden_states, self.token_ids_N,
                              restore_shape=torch.Size((num_tokens, self.hidden_shape[-1])),
                              fused=self.config.moe_permute_fusion)
        self.splits = None
        return tokens_TH.view(self.hidden_shape)
