"""The α–β all-to-all model: a hand-computed case, and a planned EP=32 layout on 4 nodes of 8 GPUs."""

import numpy as np
import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.placement.alltoall_time import Topology, alltoall_seconds
from megatron_grouter.placement.planner import PlannerSettings, make_plan
from megatron_grouter.placement.synthetic import planted_block_routing


def test_slowest_rank_sets_the_time():
    # 4 ranks, 2 per node; rows of 1000 B at 1 GB/s intra and 0.5 GB/s inter, α = 1 µs
    topology = Topology(gpus_per_node=2, intra_node_GBps=1.0, inter_node_GBps=0.5, latency_us=1.0,
                        hidden_size=500, bytes_per_element=2)
    pairs_RR = np.array([[9, 100, 10, 0],
                         [0, 9, 0, 0],
                         [0, 0, 9, 0],
                         [0, 0, 300, 9]])
    # rank 2 receives 300 intra (rank 3) + 10 inter (rank 0) and talks to 2 peers:
    # 2 µs + max(300·1000 B / 1 GB/s, 10·1000 B / 0.5 GB/s) = 2 µs + 300 µs; the others are faster
    assert alltoall_seconds(pairs_RR, topology) == pytest.approx(302e-6)
    assert alltoall_seconds(np.diag([5, 5, 5, 5]), topology) == 0.0  # all local: nothing moves
    with pytest.raises(UserError, match="do not fill nodes"):
        alltoall_seconds(np.zeros((12, 12)), Topology(gpus_per_node=8))


def test_planned_layout_predicted_faster_on_four_nodes_of_eight():
    topk_SLK, _ = planted_block_routing(1024, 32, 64, 4, seed=0)
    settings = PlannerSettings(ep_size=32, global_batch=256, ranks_per_node=8, search_samples=512)
    plan, report = make_plan(topk_SLK, 64, settings, "synthetic")
    topology = Topology(gpus_per_node=8)
    default = alltoall_seconds(report.default.pairs_RR / report.batches, topology)
    planned = alltoall_seconds(report.planned.pairs_RR / report.batches, topology)
    lines = report.alltoall_lines(topology)
    print("\n" + "\n".join(lines))
    assert 0 < planned < default and "8 GPUs/node" in lines[0] and "planned ÷ default" in lines[1]
    assert plan.groups()["node"] == (plan.expert_to_rank() // 8).tolist()
    assert report.default.pairs_RR.sum() == 1024 * 32 * 4  # every pair counted once


def test_one_node_prints_no_nan():
    topk_SLK, _ = planted_block_routing(256, 16, 16, 2, seed=1)
    plan, report = make_plan(topk_SLK, 16, PlannerSettings(ep_size=4, global_batch=64, ranks_per_node=4,
                                                           search_samples=128), "synthetic")
    lines = report.lines() + report.alltoall_lines(Topology(gpus_per_node=4))
    assert not any("nan" in line for line in lines)
    assert any(line.startswith("dedup_sends_node: n/a") for line in lines)
    assert plan.stats["ratios_to_default"]["dedup_sends_node"] is None
