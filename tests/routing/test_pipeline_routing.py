"""Preemptive routing under megatron's 1F1B pipeline schedule: the routing of each micro-batch
is looked up in the forward step of the micro-batch the stage is running, so PP=2 (forward of
micro-batch i+1 before backward of i) trains the same model as PP=1."""

import pytest

from tests.routing.grouter_fixtures import predispatched_corpus
from tests.train_runs import MICRO_MODEL, read_metrics, torchrun, train_in_process

# 4 micro-batches per step: 1F1B really interleaves forwards and backwards
MODEL = [*MICRO_MODEL, "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def routed_data(stdlib_data, tmp_path_factory):
    return predispatched_corpus(stdlib_data, tmp_path_factory.mktemp("pipeline_routing"))


def overrides(setup, router, out_dir):
    data = setup["data"]
    return [f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
            f"data.out_dir={data['out_dir']}", *MODEL, f"router={router}",
            f"router.grouter.path={setup['grouter']}", "router.grouter.source=cached",
            f"router.grouter.cache={setup['cache']}", "train.steps=5", "train.warmup_steps=1",
            "train.eval_interval=5", "train.eval_iters=1", "data.split='80,10,10'", "train.save_interval=-1",
            "train.resume=none", f"train.out_dir={out_dir}"]


@pytest.mark.slow
@pytest.mark.parametrize("router", ["aux_loss", "grouter_fixed", "hash"])
def test_two_stage_pipeline_matches_one_stage(routed_data, router, tmp_path):
    train_in_process(overrides(routed_data, router, tmp_path / "pp1"))
    torchrun(2, [*overrides(routed_data, router, tmp_path / "pp2"), "parallel.pipeline=2"])
    one, two = read_metrics(tmp_path / "pp1"), read_metrics(tmp_path / "pp2")
    losses = lambda records, key: [r[key] for r in records if key in r]  # noqa: E731
    assert len(losses(two, "loss")) == 5
    assert losses(two, "loss") == pytest.approx(losses(one, "loss"), rel=1e-5)
    assert losses(two, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-5)
    # layer 1 lives on stage 1: its load reaches rank 0's log
    assert losses(two, "moe/max_vio_layer1") == pytest.approx(losses(one, "moe/max_vio_layer1"), rel=1e-4)


@pytest.mark.slow
def test_pipeline_with_expert_parallel_planned_dispatch(routed_data, tmp_path):
    """PP=2 × EP=2 on 4 processes, split sizes planned per micro-batch inside the forward step."""
    train_in_process(overrides(routed_data, "grouter_fixed", tmp_path / "one"))
    torchrun(4, [*overrides(routed_data, "grouter_fixed", tmp_path / "four"), "parallel.pipeline=2",
                 "parallel.expert=2", "parallel.dispatcher=planned",
                 "parallel.verify_dispatch_plan=true"], timeout=900)
    one, four = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "four")
    losses = lambda records: [r["loss"] for r in records if "loss" in r]  # noqa: E731
    assert losses(four) == pytest.approx(losses(one), rel=1e-5)
