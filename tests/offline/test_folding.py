"""Co-activation affinity, expert folding and expert expanding of real Grouters on the default corpus."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.grouter.checkpoint import load_grouter, save_grouter
from megatron_grouter.grouter.network import Grouter
from megatron_grouter.offline.affinity import compute_affinity, load_affinity
from megatron_grouter.offline.convert_cli import run_affinity, run_expand, run_fold, window_batches
from megatron_grouter.offline.expanding import collect_routing, expand_grouter
from megatron_grouter.offline.folding import (fold_groups, fold_grouter, group_sizes, mapping_matrix,
                                              within_group_mass)

from tests.offline.distill_runs import compose_tool
from tests.routing.grouter_fixtures import random_grouter, small_corpus


@pytest.fixture(scope="module")
def corpus(stdlib_data, tmp_path_factory):
    torch.set_num_threads(1)
    return small_corpus(stdlib_data, tmp_path_factory.mktemp("fold_corpus"), documents=30)


@pytest.fixture(scope="module")
def grouter_dir(corpus, tmp_path_factory):
    return random_grouter(corpus["tokenizer"], tmp_path_factory.mktemp("fold_grouter") / "g", seed=3)


def random_affinity(num_experts: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.integers(0, 100, (num_experts, num_experts)), 1)
    matrix = upper + upper.T
    np.fill_diagonal(matrix, rng.integers(100, 1000, num_experts))
    return matrix


@pytest.mark.parametrize("num_source,num_target", [(8, 4), (8, 3), (16, 5), (10, 9), (7, 1), (128, 48)])
@pytest.mark.parametrize("strategy", ["affinity", "balance", "random"])
def test_every_expert_lands_in_exactly_one_group_of_the_right_size(num_source, num_target, strategy):
    groups = fold_groups(random_affinity(num_source, num_source + num_target), num_target, strategy, seed=1)
    assert sorted(expert for group in groups for expert in group) == list(range(num_source))
    base, extra = divmod(num_source, num_target)
    assert sorted((len(group) for group in groups), reverse=True) == [base + 1] * extra + [base] * (num_target - extra)
    assert sorted(group_sizes(num_source, num_target)) == sorted(len(group) for group in groups)
    mapping = mapping_matrix(groups, num_source)
    assert mapping.shape == (num_source, num_target) and (mapping.sum(axis=1) == 1).all()


def test_affinity_folding_recovers_planted_blocks():
    rng = np.random.default_rng(0)
    num_blocks, block = 6, 4
    num_source = num_blocks * block
    labels = rng.permutation(np.repeat(np.arange(num_blocks), block))
    noise = np.triu(rng.integers(0, 30, (num_source, num_source)), 1)
    planted = np.where(labels[:, None] == labels[None, :], rng.integers(200, 400, (num_source, num_source)), 0)
    matrix = np.triu(planted, 1) + noise
    matrix = matrix + matrix.T
    np.fill_diagonal(matrix, rng.integers(500, 2000, num_source))
    groups = fold_groups(matrix, num_blocks, "affinity")
    assert sorted(map(tuple, groups)) == sorted(tuple(np.flatnonzero(labels == b).tolist()) for b in range(num_blocks))
    kept = within_group_mass(matrix, groups)
    random_kept = np.mean([within_group_mass(matrix, fold_groups(matrix, num_blocks, "random", seed)) for seed in range(5)])
    balance_kept = within_group_mass(matrix, fold_groups(matrix, num_blocks, "balance"))
    print(f"within-group co-activation: affinity {kept:.3f}, balance {balance_kept:.3f}, random {random_kept:.3f} "
          f"(affinity/random = {kept / random_kept:.2f}x)")
    assert kept > 2 * random_kept and kept > balance_kept


def test_affinity_counts_are_the_grouters_coactivations(corpus, grouter_dir):
    grouter, _ = load_grouter(grouter_dir)
    batches = window_batches(grouter, corpus["prefix"], 1, 0, "train")
    affinity = compute_affinity(grouter, batches, batch_size=16, max_tokens=64 * 48, progress=False)
    tokens_BW, mask_BW = batches.gather(np.arange(48))
    indices_TK = grouter.route(tokens_BW, mask_BW)[0][mask_BW]
    expected = np.zeros((8, 8), dtype=np.int64)
    for row in indices_TK.tolist():
        for i in row:
            for j in row:
                expected[i, j] += 1
    assert affinity.matrix.dtype == np.int64 and (affinity.matrix == expected).all()
    assert affinity.tokens == int(mask_BW.sum()) and np.trace(affinity.matrix) == affinity.tokens * 2


def test_fold_tool_sums_source_logits_and_records_the_mapping(corpus, grouter_dir, tmp_path):
    summary = run_affinity(compose_tool("affinity", [f"grouter={grouter_dir}", f"data.prefix={corpus['prefix']}",
                                                     "progress=false", f"out={tmp_path / 'aff'}"]))
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    source, _ = load_grouter(grouter_dir)
    with torch.no_grad():
        source.expert_bias.copy_(torch.arange(8, dtype=torch.float32) / 10)
    save_grouter(source, tmp_path / "biased", provenance={"source_model": "test"},
                 tokenizer_fingerprint=load_grouter(grouter_dir)[1].tokenizer)
    with pytest.raises(UserError, match="another Grouter"):
        run_fold(compose_tool("fold", [f"grouter={tmp_path / 'biased'}", f"affinity={tmp_path / 'aff'}",
                                       "num_experts=3", f"out={tmp_path / 'x'}"]))
    folded_path = run_fold(compose_tool("fold", [f"grouter={grouter_dir}", f"affinity={tmp_path / 'aff'}",
                                                 "num_experts=3", f"out={tmp_path / 'g3'}"]))["grouter"]
    folded, info = load_grouter(folded_path, expected_num_experts=3)
    step = info.provenance["history"][-1]
    mapping = np.asarray(step["mapping"])
    assert step["step"] == "fold" and step["strategy"] == "affinity" and mapping.shape == (8, 3)
    tokens_BW, mask_BW = window_batches(source, corpus["prefix"], 1, 0, "eval").gather(np.arange(4))
    with torch.no_grad():
        summed_BWT = load_grouter(grouter_dir)[0].logits(tokens_BW, mask_BW) @ torch.as_tensor(mapping).float()
        torch.testing.assert_close(folded.logits(tokens_BW, mask_BW), summed_BWT, rtol=1e-5, atol=1e-4)
        rebiased = fold_grouter(source, mapping)
    torch.testing.assert_close(rebiased.expert_bias, source.expert_bias @ torch.as_tensor(mapping).float())


def test_fold_tool_refuses_bad_targets_and_foreign_data(corpus, grouter_dir, tmp_path):
    for bad in (0, -2, 8, 12):
        with pytest.raises(UserError, match="num_experts|target number|fewer target"):
            run_fold(compose_tool("fold", [f"grouter={grouter_dir}", "strategy=random", f"num_experts={bad}",
                                           f"out={tmp_path / 'x'}"]))
    with pytest.raises(UserError, match="top-2"):
        run_fold(compose_tool("fold", [f"grouter={grouter_dir}", "strategy=random", "num_experts=1",
                                       f"out={tmp_path / 'x'}"]))
    grouter, info = load_grouter(grouter_dir)
    save_grouter(grouter, tmp_path / "foreign", provenance={},
                 tokenizer_fingerprint={"vocab_size": info.tokenizer["vocab_size"], "sha256": "0" * 64})
    with pytest.raises(UserError, match="another tokenizer"):
        run_affinity(compose_tool("affinity", [f"grouter={tmp_path / 'foreign'}", f"data.prefix={corpus['prefix']}",
                                               "progress=false", f"out={tmp_path / 'aff'}"]))
    with pytest.raises(UserError, match="not found"):
        load_affinity(tmp_path / "missing")


def top1_grouter(grouter_dir: Path) -> Grouter:
    source, _ = load_grouter(grouter_dir)
    torch.manual_seed(5)
    grouter = Grouter(dataclasses.replace(source.config, topk=1))
    with torch.no_grad():
        grouter.score.weight.mul_(50)
    return grouter


def selections(grouter, batches, windows: int) -> torch.Tensor:
    tokens_BW, mask_BW = batches.gather(np.arange(windows))
    with torch.no_grad():
        indices_TK = grouter.route(tokens_BW, mask_BW)[0][mask_BW]
    return torch.zeros(len(indices_TK), grouter.config.num_experts, dtype=torch.bool).scatter_(1, indices_TK, True)


def test_expanding_moves_each_parents_tokens_to_one_child_and_keeps_the_rest(corpus, grouter_dir):
    grouter = top1_grouter(grouter_dir)
    batches = window_batches(grouter, corpus["prefix"], 1, 0, "train")
    windows = 400
    hidden_TH, logits_TE = collect_routing(grouter, batches, 32, 64 * windows)
    result = expand_grouter(grouter, hidden_TH, logits_TE, 11)
    old_TE, new_TE = selections(grouter, batches, windows), selections(result.grouter, batches, windows)
    assert result.grouter.config.num_experts == 11 and len(result.parents) == 3
    load = old_TE.sum(0)
    assert sorted(result.parents) == sorted(load.topk(3).indices.tolist())
    untouched = [e for e in range(8) if e not in result.parents]
    assert torch.equal(new_TE[:, untouched], old_TE[:, untouched])
    for parent, children in result.parents.items():
        assert torch.equal(new_TE[:, children].sum(1), old_TE[:, parent].long())
        child_loads = new_TE[old_TE[:, parent]][:, children].sum(0)
        print(f"parent {parent} ({int(load[parent])} tokens) → children {children}: {child_loads.tolist()}")
        assert (child_loads > 0.1 * load[parent]).all()  # the clusters really split the tokens
    untouched_rows = torch.tensor(untouched)
    torch.testing.assert_close(result.grouter.score.weight[untouched_rows], grouter.score.weight[untouched_rows])
    assert result.violation_rate == 0.0


def test_expand_tool_with_topk2_moves_parent_tokens_to_children_exactly(corpus, grouter_dir, tmp_path):
    summary = run_expand(compose_tool("expand", [f"grouter={grouter_dir}", f"data.prefix={corpus['prefix']}",
                                                 "num_experts=10", "max_tokens=20000", f"out={tmp_path / 'g10'}"]))
    expanded, info = load_grouter(summary["grouter"], expected_num_experts=10)
    step = info.provenance["history"][-1]
    assert step["step"] == "expand" and len(step["children"]) == 2
    source, _ = load_grouter(grouter_dir)
    batches = window_batches(source, corpus["prefix"], 1, 0, "train")
    old_TE, new_TE = selections(source, batches, 20000 // 64 + 1), selections(expanded, batches, 20000 // 64 + 1)
    families = {int(parent): children for parent, children in step["children"].items()}
    from megatron_grouter.offline.expanding import count_violations

    measured = count_violations(old_TE, new_TE, families) / len(old_TE)
    print(f"top-2 expansion 8 → 10: routing violations {measured:.5f} on {len(old_TE)} tokens (alpha {step['alpha']})")
    assert measured == 0.0 and summary["violation_rate"] == 0.0
    untouched = [e for e in range(8) if str(e) not in step["children"]]
    assert torch.equal(new_TE[:, untouched], old_TE[:, untouched])
    for parent, children in families.items():
        assert torch.equal(new_TE[:, children].sum(1), old_TE[:, parent].long())
        assert (new_TE[old_TE[:, parent]][:, children].sum(0) > 0).all()  # every child gets tokens
    # gate weights survive too: the old weight of a parent is its child's weight now
    rows = np.arange(200)
    tokens_BW, mask_BW = batches.gather(rows)
    old_ids, old_w = source.route(tokens_BW, mask_BW)
    new_ids, new_w = expanded.route(tokens_BW, mask_BW)
    parent_of = torch.tensor(expanded.config.expert_groups)
    # Compared as (expert, weight) sets per token: the order of an exact tie (gates 0.5 / 0.5) is
    # the top-k kernel's choice and may differ between the two networks.
    old_ids_TK, old_w_TK = old_ids[mask_BW], old_w[mask_BW]
    new_parent_TK, new_w_TK = parent_of[new_ids][mask_BW], new_w[mask_BW]
    old_order, new_order = old_ids_TK.argsort(dim=-1), new_parent_TK.argsort(dim=-1)
    assert torch.equal(new_parent_TK.gather(-1, new_order), old_ids_TK.gather(-1, old_order))
    torch.testing.assert_close(new_w_TK.gather(-1, new_order), old_w_TK.gather(-1, old_order), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="more target experts"):
        run_expand(compose_tool("expand", [f"grouter={grouter_dir}", f"data.prefix={corpus['prefix']}",
                                           "num_experts=8", f"out={tmp_path / 'x'}"]))


@pytest.mark.slow
def test_affinity_under_torchrun_equals_one_process(corpus, grouter_dir, tmp_path):
    from tests.train_runs import torchrun

    common = [f"grouter={grouter_dir}", f"data.prefix={corpus['prefix']}", "progress=false",
              "batch_size=8", f"max_tokens={64 * 60}"]
    run_affinity(compose_tool("affinity", [*common, f"out={tmp_path / 'one'}"]))
    torchrun(2, ["affinity", *common, f"out={tmp_path / 'two'}"], timeout=300,
             module="megatron_grouter.offline.convert_cli")
    one, two = load_affinity(tmp_path / "one"), load_affinity(tmp_path / "two")
    assert one.tokens == two.tokens > 0 and (one.matrix == two.matrix).all()
