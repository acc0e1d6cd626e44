"""The seams through which we enter megatron-core fail loudly when a release changes under us.

Real megatron-core models and layers in a one-process gloo group; the version refusal in fresh
interpreters that see another megatron-core release (a dist-info directory first on sys.path).
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_grouter.megatron_compat import (UnsupportedMegatronCore, check_supported, installed_version,
                                              needs, parse_version, plugin_moe_spec)
from megatron_grouter.runtime.cpu_compat import answers_for
from megatron_grouter.training.config import ModelConfig, ParallelConfig, RouterConfig

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=4, kv_channels=8,
                    ffn_hidden_size=64, num_experts=4, moe_ffn_hidden_size=16, topk=2, first_dense_layers=1,
                    max_position_embeddings=64)


@pytest.fixture(scope="module")
def one_process():
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    init_distributed(num_experts=MODEL.num_experts)
    yield
    shutdown_distributed()


def moe_layers_of(router: RouterConfig, parallel: ParallelConfig):
    from megatron_grouter.training.model import build_gpt_model, moe_layers

    model = build_gpt_model(MODEL, router, parallel, vocab_size=128)
    return model, moe_layers(model)


@pytest.mark.parametrize("router_type, router_class", [
    ("topk", "MeteredTopKRouter"), ("grouter_fixed", "FixedRouter"), ("grouter_hybrid", "HybridRouter"),
    ("hash", "HybridRouter"), ("probmoe", "ProbMoERouter")])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall", "planned"])
def test_every_moe_layer_is_ours_with_our_router_and_dispatcher(one_process, router_type, router_class,
                                                                dispatcher):
    from megatron_grouter.dispatch.planned_dispatcher import PlannedAllToAllDispatcher
    from megatron_grouter.training.moe_layer import PluginMoELayer

    _, layers = moe_layers_of(RouterConfig(type=router_type), ParallelConfig(dispatcher=dispatcher))
    assert len(layers) == MODEL.num_layers - MODEL.first_dense_layers
    for layer in layers:
        assert type(layer) is PluginMoELayer
        assert type(layer.router).__name__ == router_class
        assert type(layer.router).__module__.startswith("megatron_grouter.")
        planned = isinstance(layer.token_dispatcher, PlannedAllToAllDispatcher)
        assert planned == (dispatcher == "planned")
        if not planned:
            assert type(layer.token_dispatcher).__module__.startswith("megatron.core.")


def test_a_model_whose_layers_escaped_our_spec_is_refused(one_process):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_grouter.training.model import transformer_config
    from megatron_grouter.training.moe_layer import SeamBroken, check_plugin_layers

    config = transformer_config(MODEL, RouterConfig(), ParallelConfig())
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    megatron_only = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=64)
    with pytest.raises(SeamBroken, match="is MoELayer, not PluginMoELayer") as caught:
        check_plugin_layers(megatron_only, None)
    assert "\n" not in str(caught.value) and installed_version() in str(caught.value)

    ours, _ = moe_layers_of(RouterConfig(type="grouter_fixed"), ParallelConfig())  # allgather dispatcher
    from megatron_grouter.dispatch.planned_dispatcher import PlannedAllToAllDispatcher

    with pytest.raises(SeamBroken, match="has dispatcher MoEAllGatherTokenDispatcher"):
        check_plugin_layers(ours, PlannedAllToAllDispatcher)


def test_both_spec_forms_become_our_layer(one_process):
    """0.16–0.17 name the MoE layer with a ModuleSpec, 0.18+ with a functools.partial: both are read,
    and the layer each form gives is built with our router whatever release is installed."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_grouter.megatron_compat import building_plugin_layers
    from megatron_grouter.routing.metered_router import MeteredTopKRouter
    from megatron_grouter.training.model import transformer_config
    from megatron_grouter.training.moe_layer import PluginMoELayer

    installed = get_moe_module_spec(use_te=False, num_experts=MODEL.num_experts)
    submodules = installed.submodules if isinstance(installed, ModuleSpec) else installed.keywords["submodules"]
    forms = {"ModuleSpec": ModuleSpec(module=MoELayer, submodules=submodules),
             "partial": functools.partial(MoELayer, submodules=submodules)}
    assert plugin_moe_spec(ModuleSpec(module=torch.nn.Identity), PluginMoELayer, MeteredTopKRouter) is None
    config = transformer_config(MODEL, RouterConfig(), ParallelConfig())
    for form, spec in forms.items():
        ours = plugin_moe_spec(spec, PluginMoELayer, MeteredTopKRouter)
        assert type(ours) is type(spec), form
        with building_plugin_layers():
            layer = build_module(ours, config=config) if isinstance(ours, ModuleSpec) else ours(config=config)
        assert type(layer) is PluginMoELayer and type(layer.router) is MeteredTopKRouter, form
        assert submodules.router is not MeteredTopKRouter  # megatron's spec object is not modified


def test_planned_split_sizes_are_the_shared_routing_functions(one_process):
    """The planned dispatcher's split sizes (from the count exchange of `copies_E`) equal what the
    router routed, with a slot permutation, scaling and a dynamic activation threshold."""
    from megatron_grouter.dispatch.planner import DispatchPlanner
    from megatron_grouter.routing.context import RoutingContext
    from megatron_grouter.routing.microbatch import RoutingRule, route_micro_batch
    from megatron_grouter.training.model import build_gpt_model, moe_layers

    router = RouterConfig(type="grouter_fixed")
    context = RoutingContext()
    model = build_gpt_model(MODEL, router, ParallelConfig(dispatcher="planned", verify_dispatch_plan=True),
                            vocab_size=128, context=context)
    generator = torch.Generator().manual_seed(3)
    batch, seq = 2, 16
    scores_BSE = torch.rand(batch, seq, MODEL.num_experts, generator=generator)
    weights_BSK, indices_BSK = torch.softmax(scores_BSE * 4, -1).topk(MODEL.topk, dim=-1)
    rule = RoutingRule(MODEL.num_experts, slot_of_expert=torch.tensor([2, 0, 3, 1]), scaling_factor=1.5,
                       activation_threshold=0.6)
    routing = route_micro_batch(indices_BSK, weights_BSK, rule)
    assert 0 < int(routing.copies_E.sum()) < batch * seq * MODEL.topk  # the threshold dropped some copies
    [plan] = DispatchPlanner(None, torch.device("cpu"), verify=True).plans([routing], step=0, training=True)
    layer = moe_layers(model)[0]
    hidden_SBH = torch.randn(seq, batch, MODEL.hidden_size, generator=generator)
    with context.serving(routing.with_plan(plan)):
        _, routing_map_TE = layer.router(hidden_SBH)
        splits = layer.token_dispatcher.rank_splits(routing_map_TE)  # verify mode: compares with the map
        output, _ = layer(hidden_SBH)
    assert torch.equal(routing_map_TE.sum(0), routing.copies_E)
    assert splits.input_splits == [int(routing.copies_E.sum())]
    assert torch.equal(splits.tokens_per_local_expert, routing.copies_E)
    assert torch.isfinite(output).all()


def test_version_range():
    assert parse_version("0.19.2") == (0, 19, 2) and parse_version("0.17.0rc1") == (0, 17, 0)
    assert parse_version("0.16.1+nv25.11") == (0, 16, 1)
    for supported in ("0.16.1", "0.17.1", "0.18.2", "0.19.2", "0.19.9"):
        assert check_supported(supported) == supported
    for unsupported in ("0.16.0", "0.15.3", "0.20.0", "1.0.0", None):
        with pytest.raises(UnsupportedMegatronCore, match=r">=0\.16\.1,<0\.20") as caught:
            check_supported(unsupported) if unsupported else check_supported("0")
        assert "\n" not in str(caught.value)
    assert needs("0.16.1", "0.17.0", "0.16.1") and not needs("0.16.1", "0.17.0", "0.19.2")


def test_cpu_answers_only_where_they_are_needed():
    te_answer = "te_general_gemm bound when Transformer Engine is missing"
    assert answers_for("0.16.1", cuda=True) == [te_answer]
    assert answers_for("0.19.2", cuda=True) == []
    on_cpu = answers_for("0.19.2", cuda=False)
    assert te_answer not in on_cpu and len(on_cpu) == len(answers_for("0.16.1", cuda=False)) - 1


@pytest.mark.parametrize("release", ["0.15.3", "0.20.0"])
def test_an_unsupported_megatron_core_is_refused_at_import_in_one_line(tmp_path, release):
    shadow = tmp_path / "site"
    info = shadow / f"megatron_core-{release}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: megatron-core\nVersion: {release}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}
    command = subprocess.run([sys.executable, "-m", "megatron_grouter.train", "--help"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert command.returncode == 2, command.stderr
    assert command.stderr.strip() == (f"error: megatron-core {release} is not supported: megatron-grouter needs "
                                      "megatron-core >=0.16.1,<0.20; install a supported release: "
                                      "pip install 'megatron-core>=0.16.1,<0.20'")
    library = subprocess.run([sys.executable, "-c", "import megatron_grouter"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert library.returncode == 1 and "UnsupportedMegatronCore" in library.stderr
    assert f"megatron-core {release} is not supported" in library.stderr.splitlines()[-1]
