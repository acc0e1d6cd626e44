"""megatron-core's step machinery under our trainer: finalize_model_grads (aux-loss-free bias
update), the bf16 mixed-precision optimizer with fp32 main params, the distributed optimizer,
and the pipeline schedules — each against a reference run of the same model."""

import shutil

import numpy as np
import pytest
import torch

from tests.train_runs import (MICRO_MODEL, compose, data_overrides, read_metrics, torchrun,
                        train_in_process, train_losses)


def common(data, out_dir, steps, *extra, resume="none", save_interval=-1):
    return [*data_overrides(data), *MICRO_MODEL, f"train.steps={steps}", "train.warmup_steps=1",
            "train.eval_interval=0", f"train.save_interval={save_interval}",
            f"train.resume={resume}", f"train.out_dir={out_dir}", *extra]


def step_records(out_dir):
    return [record for record in read_metrics(out_dir) if "loss" in record]


def test_aux_loss_free_bias_moves_every_step_and_balances(stdlib_data, tmp_path):
    steps = 60
    train_in_process(common(stdlib_data, tmp_path / "bias", steps, "router=aux_loss_free",
                            "router.bias_update_rate=0.01"))
    train_in_process(common(stdlib_data, tmp_path / "frozen", steps, "router=aux_loss_free",
                            "router.enable_expert_bias=false"))
    with_bias, without = step_records(tmp_path / "bias"), step_records(tmp_path / "frozen")
    assert all(record["moe/expert_bias_change"] > 0 for record in with_bias)
    assert with_bias[-1]["moe/expert_bias_abs"] > 0
    assert "moe/expert_bias_change" not in without[-1]
    balanced = np.mean([record["moe/max_vio"] for record in with_bias[-10:]])
    unbalanced = np.mean([record["moe/max_vio"] for record in without[-10:]])
    assert balanced < 0.5 * unbalanced, (balanced, unbalanced)


def build(overrides):
    from megatron_grouter.runtime.distributed import init_distributed
    from megatron_grouter.train import build_trainer
    from megatron_grouter.training.config import to_train_config

    return build_trainer(to_train_config(compose(overrides)), init_distributed())


def test_bf16_keeps_fp32_main_params_and_updates_every_touched_row(stdlib_data, tmp_path):
    trainer = build(common(stdlib_data, tmp_path / "bf16", 3, "train.bf16=true"))
    embedding = trainer.raw_chunks[0].embedding.word_embeddings.weight
    assert embedding.dtype == torch.bfloat16
    main_params = [param for group in trainer.optimizer.param_groups for param in group["params"]]
    assert main_params and all(param.dtype == torch.float32 for param in main_params)
    before = embedding.detach().clone()
    seen = torch.zeros(embedding.shape[0], dtype=torch.bool)
    for _ in range(3):
        for index in trainer.schedule.rank_sample_ids(trainer.step, trainer.dp_rank):
            seen[torch.as_tensor(trainer.train_dataset[index]["tokens"]).long()] = True
        trainer.train_step()
        trainer.step += 1
    changed = (embedding.detach() != before).any(dim=1)
    assert seen.sum() > 100
    assert bool(changed[seen].all()), f"{int((~changed[seen]).sum())} of {int(seen.sum())} rows unchanged"


def test_bf16_loss_curve_tracks_fp32(stdlib_data, tmp_path):
    steps = 20
    train_in_process(common(stdlib_data, tmp_path / "fp32", steps))
    train_in_process(common(stdlib_data, tmp_path / "bf16", steps, "train.bf16=true"))
    fp32, bf16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    # bf16 activations and weights: per-step losses within 1% of fp32, and it learns as much.
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=1e-2)
    assert fp32[1] - bf16[steps] > 0.9 * (fp32[1] - fp32[steps])


@pytest.mark.slow
def test_distributed_optimizer_dp2_matches_dp1_and_resumes_across_dp_sizes(stdlib_data, tmp_path):
    steps = 6
    train_in_process(common(stdlib_data, tmp_path / "dp1", steps))
    distributed = ["parallel.distributed_optimizer=true"]
    torchrun(2, common(stdlib_data, tmp_path / "dp2", steps, *distributed))
    reference, sharded = train_losses(tmp_path / "dp1"), train_losses(tmp_path / "dp2")
    assert sorted(sharded) == list(range(1, steps + 1))
    for step in reference:  # same maths; DP only changes the order of the gradient sums
        assert sharded[step] == pytest.approx(reference[step], rel=1e-5)

    # Stop after 3 steps at DP=2, then resume once at DP=2 and once at DP=1 (resharded state).
    torchrun(2, common(stdlib_data, tmp_path / "part", steps, *distributed,
                       "train.max_steps_this_run=3", save_interval=3))
    shutil.copytree(tmp_path / "part", tmp_path / "part_dp1")
    torchrun(2, common(stdlib_data, tmp_path / "part", steps, *distributed, resume="auto"))
    torchrun(1, common(stdlib_data, tmp_path / "part_dp1", steps, *distributed, resume="auto"))
    same_layout, fewer_ranks = train_losses(tmp_path / "part"), train_losses(tmp_path / "part_dp1")
    for step in range(4, steps + 1):
        assert same_layout[step] == sharded[step]  # bit-exact with the same layout
        assert fewer_ranks[step] == pytest.approx(sharded[step], rel=1e-5)


@pytest.mark.slow
def test_distributed_optimizer_with_expert_parallelism(stdlib_data, tmp_path):
    torchrun(2, common(stdlib_data, tmp_path / "ep", 5, "parallel=ep2"))
    torchrun(2, common(stdlib_data, tmp_path / "epdo", 5, "parallel=ep2",
                       "parallel.distributed_optimizer=true"))
    plain, sharded = train_losses(tmp_path / "ep"), train_losses(tmp_path / "epdo")
    for step in plain:
        assert sharded[step] == pytest.approx(plain[step], rel=1e-5)


@pytest.mark.slow
def test_interleaved_pipeline_matches_one_stage(stdlib_data, tmp_path):
    deeper = ["model.num_layers=4"]
    train_in_process(common(stdlib_data, tmp_path / "pp1", 5, *deeper))
    run = torchrun(2, common(stdlib_data, tmp_path / "vp", 5, *deeper, "parallel.pipeline=2",
                             "parallel.virtual_pipeline=2"))
    assert "PP=2" in run.stdout + run.stderr
    reference, interleaved = step_records(tmp_path / "pp1"), step_records(tmp_path / "vp")
    for one, two in zip(reference, interleaved, strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        # Loads and aux losses of every layer reach the log, whichever stage holds the layer.
        assert two["moe/max_vio_layer3"] == pytest.approx(one["moe/max_vio_layer3"], rel=1e-4)
        assert two["moe/load_balancing_loss"] == pytest.approx(one["moe/load_balancing_loss"], rel=1e-4)


def test_checkpoint_of_the_old_trainer_is_refused_in_one_line(stdlib_data, tmp_path):
    import json

    from megatron_grouter.errors import UserError

    train_in_process(common(stdlib_data, tmp_path, 2, save_interval=2))
    state_file = tmp_path / "checkpoints" / "step_0000002" / "train_state.json"
    state = json.loads(state_file.read_text())
    state.pop("checkpoint_format")  # what the torch-AdamW trainer wrote
    state_file.write_text(json.dumps(state))
    with pytest.raises(UserError, match="older megatron-grouter trainer") as error:
        train_in_process(common(stdlib_data, tmp_path, 4, resume="auto"))
    assert "\n" not in str(error.value)
