"""mg-train with the planned dispatcher: same losses as megatron's allgather dispatcher.

2 gloo processes, EP=2, a random Grouter's routing cache (router=grouter_fixed). The planned run
verifies in every MoE layer that the host-side plan equals the routing the router produced, so a
plan built from the wrong peer batch fails the run instead of passing by luck.
"""

import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.training.config import to_train_config, validate
from tests.routing.grouter_fixtures import NUM_EXPERTS, TOPK, random_grouter, small_corpus
from tests.train_runs import compose, torchrun, train_losses

ROUTED_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                "model.ffn_hidden_size=128", f"model.num_experts={NUM_EXPERTS}",
                "model.moe_ffn_hidden_size=64", f"model.topk={TOPK}", "train.seq_length=64",
                "train.micro_batch_size=2", "train.global_batch_size=8"]


@pytest.fixture(scope="module")
def routed_data(stdlib_data, tmp_path_factory):
    from tests.offline.distill_runs import compose_tool

    from megatron_grouter.offline.predispatch import predispatch

    root = tmp_path_factory.mktemp("planned")
    data = small_corpus(stdlib_data, root / "corpus", documents=20)
    grouter = random_grouter(data["tokenizer"], root / "grouter")
    predispatch(compose_tool("predispatch", [f"grouter={grouter}", f"data.prefix={data['prefix']}",
                                             f"data.tokenizer={data['tokenizer']}",
                                             f"cache={root / 'cache'}", "chunk_windows=16"]))
    return [f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
            f"data.out_dir={data['out_dir']}", *ROUTED_MODEL, "router=grouter_fixed",
            f"router.grouter.path={grouter}", "router.grouter.source=cached",
            f"router.grouter.cache={root / 'cache'}", "train.steps=3", "train.warmup_steps=1",
            "train.eval_interval=0", "train.save_interval=-1", "data.split='80,10,10'"]


def test_planned_dispatcher_trains_like_allgather(routed_data, tmp_path):
    torchrun(2, [*routed_data, "parallel=ep2", f"train.out_dir={tmp_path / 'allgather'}"])
    planned = torchrun(2, [*routed_data, "parallel=ep2_planned", "parallel.verify_dispatch_plan=true",
                           f"train.out_dir={tmp_path / 'planned'}"])
    assert "planned on the host" in planned.stdout + planned.stderr
    reference, losses = train_losses(tmp_path / "allgather"), train_losses(tmp_path / "planned")
    assert sorted(losses) == sorted(reference) == [1, 2, 3]
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("overrides, world, needle", [
    (["parallel.dispatcher=planned"], 1, "needs expert parallelism"),
    (["parallel.dispatcher=scatter"], 1, "parallel.dispatcher='scatter' is unknown"),
    (["parallel=ep2", "parallel.verify_dispatch_plan=true"], 2, "set parallel.dispatcher=planned"),
])
def test_dispatcher_config_errors_are_one_line(overrides, world, needle):
    with pytest.raises(UserError) as error:
        validate(to_train_config(compose(overrides)), world_size=world)
    assert needle in str(error.value) and "\n" not in str(error.value)
