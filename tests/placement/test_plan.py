"""Plan persistence: atomic round trip, fingerprint check, corrupt and inconsistent plans."""

import numpy as np
import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.placement.plan import Plan


def small_plan(fingerprint: str = "routing-cache-123") -> Plan:
    rng = np.random.default_rng(0)
    return Plan(
        num_experts=8, top_k=2, ep_size=4, ranks_per_node=2, granularity="gpu",
        routing_cache_fingerprint=fingerprint, slot_to_expert=rng.permutation(8),
        placement_QRM=rng.permutation(24).reshape(3, 4, 2), stats={"ratio": 0.8},
    )


def test_round_trip(tmp_path):
    plan = small_plan()
    path = plan.save(tmp_path / "plans" / "ep.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["ep.npz"]
    loaded = Plan.load(path)
    np.testing.assert_array_equal(loaded.slot_to_expert, plan.slot_to_expert)
    np.testing.assert_array_equal(loaded.placement_QRM, plan.placement_QRM)
    assert (loaded.num_experts, loaded.ep_size, loaded.granularity, loaded.stats) == (8, 4, "gpu", {"ratio": 0.8})
    np.testing.assert_array_equal(loaded.expert_to_slot()[plan.slot_to_expert], np.arange(8))
    assert loaded.sample_to_rank(24)[plan.placement_QRM[1, 2]].tolist() == [2, 2]
    loaded.check_matches("routing-cache-123")


def test_mismatched_fingerprint_refused():
    with pytest.raises(UserError, match="rerun the planner"):
        small_plan().check_matches("another-cache")


def test_corrupt_or_missing_file_refused(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="unreadable"):
        Plan.load(broken)
    with pytest.raises(UserError, match="does not exist"):
        Plan.load(tmp_path / "missing.npz")


def test_inconsistent_plan_refused():
    with pytest.raises(UserError, match="permutation"):
        Plan(8, 2, 4, 2, "gpu", "x", np.zeros(8, dtype=int), np.arange(8).reshape(1, 4, 2))
    with pytest.raises(UserError, match="twice"):
        Plan(8, 2, 4, 2, "gpu", "x", np.arange(8), np.zeros((1, 4, 2), dtype=int))
