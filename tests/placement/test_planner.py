"""End-to-end planner: planted structure, capacity, joint search vs paper, exact tiny optimum."""

import numpy as np
import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.placement.bounds import capacity_free_sends, exact_optimum
from megatron_grouter.placement.joint_search import placed_sends
from megatron_grouter.placement.layout import contiguous_expert_to_rank, sequential_batches
from megatron_grouter.placement.planner import PlannerSettings, choose_groups, make_plan
from megatron_grouter.placement.synthetic import mixed_skill_routing, planted_block_routing

from .test_expert_groups import same_partition


@pytest.fixture(scope="module")
def planted():
    return planted_block_routing(num_samples=2048, tokens_per_sample=64, num_experts=32, top_k=4, seed=0)


def test_planted_plan_recovers_blocks_and_beats_default(planted):
    topk_SLK, block_E = planted
    batches_QB = np.random.default_rng(1).permutation(2048).reshape(8, 256)
    plan, report = make_plan(topk_SLK, 32, PlannerSettings(ep_size=8, global_batch=256, ranks_per_node=4),
                             "cache-A", batches_QB)
    ratios = report.planned.ratios_to(report.default)
    print("\nplanted E=32 K=4 EP=8: " + "; ".join(report.lines()))
    assert same_partition(plan.expert_to_rank(), block_E)
    assert ratios["dedup_sends_rank"] < 0.75 and ratios["pairs_leaving_rank"] < 0.6
    assert ratios["dedup_sends_node"] < 0.9
    # equal shares: every rank gets B / EP samples of every batch, each batch's samples exactly once
    assert plan.placement_QRM.shape == (8, 8, 32)
    for q in range(8):
        assert sorted(plan.placement_QRM[q].ravel().tolist()) == sorted(batches_QB[q].tolist())
    assert report.capacity_free_sends <= report.planned.dedup_sends_rank


def test_joint_search_beats_paper_and_coactivation():
    topk_SLK = mixed_skill_routing(num_samples=1024, tokens_per_sample=64, seed=2)
    sends = {}
    for method in ("paper", "coactivation", "joint"):
        settings = PlannerSettings(ep_size=8, global_batch=128, method=method)
        _, report = make_plan(topk_SLK, 32, settings, "cache-B")
        sends[method] = report.planned.dedup_sends_rank / report.default.dedup_sends_rank
        relaxed = report.capacity_free_sends / report.default.dedup_sends_rank
    print("\nmixed skills dedup sends vs default: " + ", ".join(f"{k} {v:.3f}x" for k, v in sends.items())
          + f"; capacity-free relaxation of the joint groups {relaxed:.3f}x")
    assert sends["joint"] <= min(sends["paper"], sends["coactivation"])
    assert sends["joint"] < 0.95


def test_joint_search_reaches_exact_optimum_of_tiny_instance():
    topk_SLK = mixed_skill_routing(num_samples=48, tokens_per_sample=32, num_experts=12, top_k=3, num_topics=6,
                                   num_skills=8, experts_per_skill=3, seed=0)
    batches_QB = sequential_batches(48, 24)
    optimum, _ = exact_optimum(topk_SLK, batches_QB, 12, 3)
    default, _ = placed_sends(topk_SLK, batches_QB, contiguous_expert_to_rank(12, 3), 3)
    found = {}
    for method in ("paper", "joint"):
        groups = choose_groups(topk_SLK, batches_QB, 12, PlannerSettings(ep_size=3, global_batch=24, ranks_per_node=1, method=method))
        found[method], _ = placed_sends(topk_SLK, batches_QB, groups, 3)
    print(f"\ntiny E=12 EP=3 (5775 splits): optimum {optimum / default:.3f}x default, "
          f"joint {found['joint'] / default:.3f}x, paper {found['paper'] / default:.3f}x")
    assert optimum <= found["joint"] <= found["paper"]
    assert found["joint"] <= optimum * 1.01
    assert capacity_free_sends(topk_SLK, groups, 3) <= found["joint"]


def test_node_granularity_plan():
    topk_SLK, _ = planted_block_routing(num_samples=512, tokens_per_sample=32, seed=3)
    settings = PlannerSettings(ep_size=8, global_batch=64, ranks_per_node=4, granularity="node", method="coactivation",
                               report_samples=128)
    plan, report = make_plan(topk_SLK, 32, settings, "cache-C")
    assert report.planned.tokens == report.default.tokens == 128 * 32
    print("\nnode granularity (2 nodes x 4 GPUs): " + "; ".join(report.lines()[:4]))
    assert plan.num_partitions == 2
    assert report.planned.dedup_sends_node < report.default.dedup_sends_node
    assert np.bincount(plan.expert_to_rank()).tolist() == [4] * 8


@pytest.mark.parametrize(
    "settings, message",
    [
        (PlannerSettings(ep_size=6, global_batch=48, ranks_per_node=2), "split evenly"),
        (PlannerSettings(ep_size=8, global_batch=36), "divisible"),
        (PlannerSettings(ep_size=8, global_batch=64, method="magic"), "method"),
        (PlannerSettings(ep_size=8, global_batch=64, ranks_per_node=3), "ranks per node"),
    ],
)
def test_bad_settings_are_refused(planted, settings, message):
    with pytest.raises(UserError, match=message):
        make_plan(planted[0], 32, settings, "cache-D")
