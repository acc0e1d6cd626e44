"""Optimizer state across a resume is megatron-core's, for whichever optimizer class it built:
torch's Adam under the distributed optimizer gets back one step count per parameter, and an
optimizer whose per-parameter state has no `step` (like Transformer Engine's FusedAdam) never
gets one from us."""

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_grouter.training.optimizer import torch_optimizers
from megatron_grouter.training.optimizer_state import prepare_for_load, restore_step_counts
from tests.train_runs import MICRO_MODEL, compose, data_overrides, train_in_process, train_losses


def overrides(data, out_dir, *extra):
    return [*data_overrides(data), *MICRO_MODEL, "train.steps=4", "train.warmup_steps=1",
            "train.eval_interval=0", f"train.out_dir={out_dir}", *extra]


def build(config_overrides):
    from megatron_grouter.runtime.distributed import init_distributed
    from megatron_grouter.train import build_trainer
    from megatron_grouter.training.config import to_train_config

    return build_trainer(to_train_config(compose(config_overrides)), init_distributed())


def param_states(optimizer) -> list[dict]:
    return [state for chained in torch_optimizers(optimizer) for state in chained.optimizer.state.values()]


def test_distributed_optimizer_resume_gives_torch_adam_one_step_count_per_parameter(stdlib_data, tmp_path):
    distributed = "parallel.distributed_optimizer=true"
    train_in_process(overrides(stdlib_data, tmp_path / "straight", distributed, "train.save_interval=-1"))
    resumed = tmp_path / "resumed"
    train_in_process(overrides(stdlib_data, resumed, distributed, "train.save_interval=2",
                               "train.max_steps_this_run=2"))

    trainer = build(overrides(stdlib_data, resumed, distributed, "train.resume=auto"))
    trainer.maybe_resume()
    states = param_states(trainer.optimizer)
    assert states and all(set(state) == {"step", "exp_avg", "exp_avg_sq"} for state in states)
    assert len({id(state["step"]) for state in states}) == len(states)  # not one shared tensor
    assert {float(state["step"]) for state in states} == {2.0}

    train_in_process(overrides(stdlib_data, resumed, distributed, "train.save_interval=-1"))
    assert train_losses(resumed) == train_losses(tmp_path / "straight")  # bit-exact


def test_an_optimizer_without_a_per_parameter_step_never_gets_one(stdlib_data, tmp_path):
    """megatron's SGD (momentum) keeps, like TE's FusedAdam, no `step` per parameter (megatron's
    distributed optimizer accepts only Adam classes, so this is its FP32Optimizer)."""
    trainer = build(overrides(stdlib_data, tmp_path))
    config = OptimizerConfig(optimizer="sgd", sgd_momentum=0.9, lr=1e-3, bf16=False,
                             params_dtype=torch.float32)
    sgd = get_megatron_optimizer(config, trainer.model_chunks, use_gloo_process_groups=False)
    prepare_for_load(sgd)
    assert param_states(sgd) == []  # a fresh optimizer is left for megatron to allocate
    for chunk in trainer.model_chunks:
        chunk.zero_grad_buffer()
    for param in trainer.model_chunks[0].parameters():
        param.main_grad.normal_()
    sgd.step()
    before = [{key: value.clone() for key, value in state.items()} for state in param_states(sgd)]
    assert before and all(set(state) == {"momentum_buffer"} for state in before)
    prepare_for_load(sgd)
    restore_step_counts(sgd, 5)
    after = param_states(sgd)
    assert [set(state) for state in after] == [set(state) for state in before]
    assert all(torch.equal(one[key], two[key]) for one, two in zip(before, after) for key in one)
