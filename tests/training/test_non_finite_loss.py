"""A run whose loss stops being finite ends with one line naming the step and the way out."""

import pytest

from megatron_grouter.training.trainer import NonFiniteLoss
from tests.train_runs import MICRO_MODEL, data_overrides, train_in_process


def test_diverging_run_stops_with_the_last_good_checkpoint(stdlib_data, tmp_path):
    overrides = [*data_overrides(stdlib_data), *MICRO_MODEL, "train.steps=10", "train.warmup_steps=0",
                 "train.lr=1e8", "train.min_lr=1e8", "train.clip_grad=0", "train.eval_interval=0",
                 "train.save_interval=1", f"train.out_dir={tmp_path}"]
    with pytest.raises(NonFiniteLoss) as failure:
        train_in_process(overrides)
    message = str(failure.value)
    assert "\n" not in message and "lower train.lr" in message
    step = int(message.split(" at step ")[1].split(";")[0])
    checkpoint = message.split("last good checkpoint: ")[1].split(";")[0]
    assert step >= 2 and checkpoint.endswith(f"step_{step - 1:07d}")  # written just before
