"""ProbMoE routers train inside megatron-core's MoELayer, also with expert parallelism."""

import math

from tests.train_runs import MICRO_MODEL, data_overrides, read_metrics, torchrun, train_in_process, val_losses


def test_probmoe_dynamic_k_trains_within_its_range(stdlib_data, tmp_path):
    train_in_process([*data_overrides(stdlib_data), *MICRO_MODEL, "router=probmoe_dynamic_k",
                      "router.probmoe.k_min=1", "train.steps=40", "train.warmup_steps=4",
                      "train.eval_interval=20", "train.eval_iters=1", "train.save_interval=-1",
                      f"train.out_dir={tmp_path}"])
    val = val_losses(tmp_path)
    assert val[40] < val[0] - 1.0
    active = [record["moe/active_experts"] for record in read_metrics(tmp_path) if "loss" in record]
    assert all(1.0 <= value <= 2.0 for value in active)
    assert min(active) < 2.0  # some tokens really use fewer than k_max experts
    record = [record for record in read_metrics(tmp_path) if "loss" in record][-1]
    layers = range(2)
    assert all(1.0 <= record[f"moe/active_experts_layer{layer}"] <= 2.0 for layer in layers)
    # subsets of 1 or 2 of 8 experts: entropy between 0 and log(8 + 28)
    assert all(0.0 < record[f"moe/subset_entropy_layer{layer}"] < math.log(36) for layer in layers)
    assert 0.0 <= record["moe/max_vio_layer0"]


def test_probmoe_exact_k_with_expert_parallelism(stdlib_data, tmp_path):
    torchrun(2, [*data_overrides(stdlib_data), *MICRO_MODEL, "router=probmoe_exact_k", "parallel=ep2",
                 "train.steps=4", "train.warmup_steps=1", "train.eval_interval=0", "train.save_interval=-1",
                 f"train.out_dir={tmp_path}"])
    records = [record for record in read_metrics(tmp_path) if "loss" in record]
    assert len(records) == 4
    assert all(record["moe/active_experts"] == 2.0 for record in records)  # exactly k
    assert records[-1]["loss"] < records[0]["loss"]


def test_training_subset_entropy_leaves_its_maximum_within_100_steps(stdlib_data, tmp_path):
    # near-uniform sampling (logits std ~0.2 at init, temperature 1) kept it within 2.5% of
    # log C(8, 2) for the whole run; the probmoe config's temperature must sharpen it
    train_in_process([*data_overrides(stdlib_data), *MICRO_MODEL, "router=probmoe_exact_k",
                      "train.steps=110", "train.warmup_steps=10", "train.eval_interval=0",
                      "train.save_interval=-1", "train.log_interval=10", f"train.out_dir={tmp_path}"])
    late = [record["moe/subset_entropy"] for record in read_metrics(tmp_path)
            if "loss" in record and record["step"] > 100]
    assert late and max(late) < 0.98 * math.log(28)


def test_count_cost_trains_dynamic_k_towards_fewer_experts_and_logs_the_expected_size(stdlib_data, tmp_path):
    train_in_process([*data_overrides(stdlib_data), *MICRO_MODEL, "router=probmoe_dynamic_k_cost",
                      "router.probmoe.count_cost=1.0", "train.steps=40", "train.warmup_steps=4",
                      "train.eval_interval=0", "train.save_interval=-1", "train.log_interval=5",
                      f"train.out_dir={tmp_path}"])
    records = [record for record in read_metrics(tmp_path) if "loss" in record]
    first, last = records[0], records[-1]
    assert last["moe/active_experts"] < 1.5 < first["moe/active_experts"]
    # the logged E|z| (exact, from the marginals) tracks the sampled sizes
    assert abs(last["moe/probmoe_expected_experts"] - last["moe/active_experts"]) < 0.1
    assert last["loss"] < first["loss"]
