"""A tiny MoE pretraining on the built-in corpus learns: validation loss falls clearly."""

from tests.train_runs import MICRO_MODEL, data_overrides, read_metrics, train_in_process, val_losses


def test_validation_loss_falls_on_default_corpus(stdlib_data, tmp_path):
    summary = train_in_process([*data_overrides(stdlib_data), *MICRO_MODEL, "train.steps=200",
                                "train.warmup_steps=20", "train.eval_interval=100",
                                "train.eval_iters=2", "train.save_interval=-1",
                                f"train.out_dir={tmp_path}"])
    val = val_losses(tmp_path)
    assert sorted(val) == [0, 100, 200]
    # ln(4096) ≈ 8.3 at the start; code is very predictable, so 200 steps should cut it deeply.
    assert val[0] > 7.5
    assert val[200] < val[100] < val[0]
    assert val[0] - val[200] > 2.0, val
    assert summary["step"] == 200
    records = read_metrics(tmp_path)
    step_records = [record for record in records if "loss" in record]
    assert len(step_records) == 200
    first = step_records[0]
    # Every step logs the MoE load statistics and the router's auxiliary loss; the log steps
    # (every train.log_interval=20, and the last) also the window's throughput.
    assert {"moe/max_vio", "moe/load_balancing_loss", "grad_norm", "lr"} <= set(first)
    assert first["moe/load_balancing_loss"] > 0
    assert [record["step"] for record in step_records if "tokens_per_s" in record] == list(range(20, 201, 20))
