"""No host sync of ours inside a training step: with cached Grouter routing and the planned
dispatcher (EP=2, gloo), every value read to the host in a step is megatron-core's own (its
gradient-norm clipping); statistics wait on the device until the log step's single flush."""

import json

from tests.dispatch.test_planned_training import routed_data  # noqa: F401  (a fixture)
from tests.train_runs import torchrun


def test_training_steps_read_nothing_to_the_host_but_megatrons_grad_norm(routed_data, tmp_path):
    out = tmp_path / "run"
    torchrun(2, [*routed_data, "parallel=ep2_planned", "train.steps=6", "train.log_interval=3",
                 f"train.out_dir={out}"], module="tests.training.sync_counting_train")
    for rank in range(2):
        per_step = {int(step): origins for step, origins in
                    json.loads((out / f"host_syncs_rank{rank}.json").read_text()).items()}
        assert sorted(per_step) == list(range(1, 7))
        for step, origins in per_step.items():
            ours = {origin: calls for origin, calls in origins.items() if origin.startswith("megatron_grouter")}
            assert ours == {}, f"rank {rank} step {step}: {ours}"
            # the counter sees megatron's own read (clip_grad_norm's total norm), so it is not blind
            assert any(origin.startswith("megatron:") for origin in origins), origins
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == list(range(1, 7))
    assert [record["step"] for record in records if "tokens_per_s" in record] == [3, 6]
