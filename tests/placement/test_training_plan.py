"""mg-plan-ep on a real routing cache, and mg-train applying the plan (real megatron, gloo)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_grouter.dispatch.plan_book import DispatchPlanBook, book_key, book_path
from megatron_grouter.errors import UserError
from megatron_grouter.offline.plan_ep import plan_ep
from megatron_grouter.offline.predispatch import predispatch
from megatron_grouter.placement.plan import Plan
from megatron_grouter.placement.schedule import PlannedSchedule
from tests.offline.distill_runs import compose_tool
from tests.routing.grouter_fixtures import NUM_EXPERTS, TOPK, random_grouter, small_corpus
from tests.train_runs import REPO, read_metrics, repo_env, torchrun, train_in_process, train_losses

STEPS, GLOBAL_BATCH, SEQ, MICRO_BATCH = 6, 8, 64, 2  # EP=DP=2: two micro-batches per rank and step
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         f"model.num_experts={NUM_EXPERTS}", "model.moe_ffn_hidden_size=64", f"model.topk={TOPK}",
         f"train.seq_length={SEQ}", f"train.micro_batch_size={MICRO_BATCH}", f"train.global_batch_size={GLOBAL_BATCH}"]


@pytest.fixture(scope="module")
def setup(stdlib_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    data = small_corpus(stdlib_data, root / "corpus", documents=40)
    grouter = random_grouter(data["tokenizer"], root / "grouter")
    cache = root / "cache"
    predispatch(compose_tool("predispatch", [f"grouter={grouter}", f"data.prefix={data['prefix']}",
                                             f"data.tokenizer={data['tokenizer']}", f"cache={cache}"]))
    setup = {"data": data, "grouter": grouter, "cache": cache, "root": root}
    setup["summary"] = plan_ep(plan_config(setup, root / "plan.npz"))
    return setup


def plan_config(setup, out, extra=()):
    data = setup["data"]
    return compose_tool("plan_ep", [f"grouter={setup['grouter']}", f"cache={setup['cache']}",
                                    f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
                                    f"data.out_dir={data['out_dir']}", f"train.seq_length={SEQ}",
                                    f"train.global_batch_size={GLOBAL_BATCH}", f"train.steps={STEPS}",
                                    f"train.micro_batch_size={MICRO_BATCH}", "ep_size=2", "ranks_per_node=1", "search_samples=256", "progress=false",
                                    f"out={out}", *extra])


def train_overrides(setup, out_dir, plan=None, extra=()):
    data = setup["data"]
    return [f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}", f"data.out_dir={data['out_dir']}",
            *MODEL, "router=grouter_fixed", f"router.grouter.path={setup['grouter']}", "router.grouter.source=cached",
            f"router.grouter.cache={setup['cache']}", f"train.steps={STEPS}", "train.warmup_steps=2",
            "train.eval_interval=0", "train.save_interval=-1", f"train.out_dir={out_dir}",
            "parallel.ranks_per_node=1", *([f"router.grouter.plan={plan}"] if plan else []), *extra]


def counting_run(nproc: int, overrides: list[str]) -> subprocess.CompletedProcess:
    """mg-train under torchrun with its collectives counted per step and region (counting_train.py)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tests.dispatch.counting_train", *overrides]
    result = subprocess.run(command, cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def collectives(out_dir: Path, nproc: int) -> list[dict]:
    return [json.loads((out_dir / f"collectives_rank{rank}.json").read_text()) for rank in range(nproc)]


def test_plan_tool_reports_volumes_and_saves_fingerprints(setup):
    summary, plan = setup["summary"], Plan.load(setup["root"] / "plan.npz")
    assert plan.ep_size == 2 and plan.num_experts == NUM_EXPERTS and plan.global_batch == GLOBAL_BATCH
    assert plan.placement_QRM.shape[0] == summary["batches"] >= STEPS
    assert len(plan.routing_cache_fingerprint) == 64 and len(plan.training["sample_order"]) == 64
    assert summary["ratios"]["dedup_sends_rank"] <= 1.0
    assert "α–β all-to-all model" in summary["alltoall"][0] and "planned ÷ default" in summary["alltoall"][1]
    assert Path(summary["book"]) == book_path(setup["root"] / "plan.npz") and Path(summary["book"]).is_file()
    assert plan.groups()["gpu"] == plan.expert_to_rank().tolist()
    assert summary["planned"]["dedup_sends_rank"] >= summary["bound_ratio"] * summary["default"]["dedup_sends_rank"] - 1e-6


def test_schedule_keeps_global_batches_and_is_deterministic(setup, tmp_path):
    plan = Plan.load(setup["root"] / "plan.npz")
    again = Plan.load(Path(plan_ep(plan_config(setup, tmp_path / "again.npz"))["plan"]))
    np.testing.assert_array_equal(plan.placement_QRM, again.placement_QRM)  # deterministic for a seed
    np.testing.assert_array_equal(plan.slot_to_expert, again.slot_to_expert)
    num_batches = plan.placement_QRM.shape[0]
    for dp_size in (2, 4):
        schedule = PlannedSchedule(plan, dp_size)
        seen = []
        for step in range(num_batches):
            ranks = [schedule.rank_sample_ids(step, r) for r in range(dp_size)]
            assert all(len(ids) == GLOBAL_BATCH // dp_size for ids in ranks)
            batch = sorted(i for ids in ranks for i in ids)
            assert batch == list(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))  # default's set
            seen += batch
        assert sorted(seen) == list(range(num_batches * GLOBAL_BATCH))  # every sample once per epoch
        # resumable: a fresh schedule answers from the step alone, and the next epoch repeats
        fresh = PlannedSchedule(plan, dp_size)
        assert fresh.rank_sample_ids(3, 1) == schedule.rank_sample_ids(3, 1) == schedule.rank_sample_ids(
            3 + num_batches, 1)
    # EP rank r's samples are the plan's; DP=4 splits them over the two replicas of each EP rank
    assert PlannedSchedule(plan, 2).rank_sample_ids(2, 1) == plan.placement_QRM[2, 1].tolist()
    four = PlannedSchedule(plan, 4)
    assert four.rank_sample_ids(2, 1) + four.rank_sample_ids(2, 3) == plan.placement_QRM[2, 1].tolist()
    with pytest.raises(UserError, match="cannot feed"):
        PlannedSchedule(plan, 3)
    shuffled = Plan(**{**vars(plan), "placement_QRM": plan.placement_QRM[::-1].copy()})
    with pytest.raises(UserError, match="not mg-train's"):
        PlannedSchedule(shuffled, 2)


def expected_traffic(setup, plan: Plan | None, num_batches: int):
    """Per-step dispatch volumes of the plan (or default layout) straight from the cache rows."""
    from megatron_grouter.data.routing_cache import open_cache
    from megatron_grouter.offline.plan_ep import _training_dataset
    from megatron_grouter.placement.layout import contiguous_expert_to_rank
    from megatron_grouter.placement.training_samples import training_topk
    from megatron_grouter.placement.volumes import compute_volumes

    config = plan_config(setup, "unused")
    topk_SLK = training_topk(_training_dataset(config), open_cache(setup["cache"], setup["data"]["prefix"]),
                             num_batches * GLOBAL_BATCH, progress=False)
    expert_to_rank = plan.expert_to_rank() if plan else contiguous_expert_to_rank(NUM_EXPERTS, 2)
    volumes = []
    for step in range(num_batches):
        rank_S = np.full(topk_SLK.shape[0], -1)
        if plan:
            for rank in range(2):
                rank_S[plan.placement_QRM[step, rank]] = rank
        else:
            rank_S[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH] = np.arange(GLOBAL_BATCH) // (GLOBAL_BATCH // 2)
        volumes.append(compute_volumes(topk_SLK, expert_to_rank, rank_S, 2, 1))
    return volumes


def test_ep2_training_with_plan_matches_unplanned_loss_and_follows_the_plan(setup, tmp_path):
    """The judged path: a plan from mg-plan-ep on a real cache, then EP=2 with the planned
    all-to-all dispatcher (each micro-batch's plan verified against every layer's routing),
    against megatron's allgather dispatcher in the default layout."""
    plan_path = setup["root"] / "plan.npz"
    plan = Plan.load(plan_path)
    assert not np.array_equal(plan.slot_to_expert, np.arange(NUM_EXPERTS))  # a real permutation
    torchrun(2, train_overrides(setup, tmp_path / "default", extra=["parallel=ep2"]))
    run = counting_run(2, train_overrides(setup, tmp_path / "planned", plan=plan_path,
                                          extra=["parallel=ep2_planned", "parallel.verify_dispatch_plan=true"]))
    assert "looked up from" in run.stdout + run.stderr  # the offline book, verified in every layer
    default = [r for r in read_metrics(tmp_path / "default") if "loss" in r]
    planned = [r for r in read_metrics(tmp_path / "planned") if "loss" in r]
    assert len(default) == len(planned) == STEPS
    # same global batch and the same expert weights per Grouter expert: only summation order differs
    assert planned[0]["loss"] == pytest.approx(default[0]["loss"], rel=1e-6)
    for records, layout in ((default, None), (planned, plan)):
        for record, volumes in zip(records, expected_traffic(setup, layout, STEPS)):
            assert record["ep/tokens"] == volumes.tokens
            assert record["ep/pairs_leaving_rank"] == volumes.pairs_leaving_rank
            assert record["ep/sends_rank"] == volumes.dedup_sends_rank
            assert record["ep/sends_node"] == volumes.dedup_sends_node
    assert sum(r["ep/sends_rank"] for r in planned) < sum(r["ep/sends_rank"] for r in default)


def test_mismatched_plan_is_refused(setup, tmp_path):
    plan = Plan.load(setup["root"] / "plan.npz")
    # one process (EP=1) is enough to check refusals: an EP=1 copy of the plan fits but for the flaw
    single = {**vars(plan), "ep_size": 1, "placement_QRM": plan.placement_QRM.reshape(len(plan.placement_QRM), 1, -1)}
    cases = [(setup["root"] / "plan.npz", [], "is for EP 2 but parallel.expert=1"),
             (Plan(**{**single, "routing_cache_fingerprint": "0" * 64}), [], "rerun the planner"),
             (Plan(**{**single, "training": {"sample_order": "x"}}), [], "another sample order"),
             (Plan(**single), ["train.global_batch_size=16"], "global batch 8"),
             (Plan(**single), ["train.steps=100000"], "covers"),
             (Plan(**single), ["router=grouter_hybrid", "model.topk=1"], "top-2")]
    for number, (plan_or_path, extra, message) in enumerate(cases):
        path = plan_or_path if isinstance(plan_or_path, Path) else plan_or_path.save(tmp_path / f"{number}.npz")
        with pytest.raises(UserError, match=message) as caught:
            train_in_process(train_overrides(setup, tmp_path / "run", plan=path, extra=extra))
        assert "\n" not in str(caught.value)
    train_in_process(train_overrides(setup, tmp_path / "fits", plan=Plan(**single).save(tmp_path / "ok.npz"),
                                     extra=["train.steps=1"]))


def test_plan_tool_refuses_bad_input_in_one_line(setup, stdlib_data, tmp_path):
    cases = [(["ep_size=3"], "cannot be split evenly"),
             ([f"cache={tmp_path / 'none'}"], "no routing cache"),
             ([f"data.prefix={stdlib_data['prefix']}", f"data.out_dir={tmp_path}"], "another dataset"),
             (["train.global_batch_size=7"], "not divisible by 2")]
    for extra, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            plan_ep(plan_config(setup, tmp_path / "p.npz", extra))
        assert "\n" not in str(caught.value)


def test_offline_plans_train_bit_identically_to_the_count_exchange_without_collectives(setup, tmp_path):
    """Offline book vs one all-gather of the counts per step: the same plans, so the same
    losses bit for bit; inside MoE layers only the token all-to-alls, before them none (book) or
    one per step for all its micro-batches (exchange). The trainer makes step i+1's micro-batches
    during step i: step 0 plans itself and step 1, the last step plans nothing."""
    bare = tmp_path / "bare"  # the plan without its book: counts are exchanged
    bare.mkdir()
    shutil.copy(setup["root"] / "plan.npz", bare / "plan.npz")
    runs = {}
    for name, plan in (("book", setup["root"] / "plan.npz"), ("exchange", bare / "plan.npz")):
        run = counting_run(2, train_overrides(setup, tmp_path / name, plan=plan, extra=["parallel=ep2_planned"]))
        runs[name] = collectives(tmp_path / name, 2)
        assert ("looked up from" if name == "book" else "counts exchanged once per step") in run.stdout + run.stderr
    assert train_losses(tmp_path / "book") == train_losses(tmp_path / "exchange")  # exact equality
    assert sorted(train_losses(tmp_path / "book")) == list(range(1, STEPS + 1))
    for name, ranks in runs.items():
        for steps in ranks:
            assert sorted(steps) == [str(step) for step in range(STEPS)]
            planning = []
            for step in range(STEPS):
                regions = steps[str(step)]
                moe = regions.get("moe", {})
                assert set(moe) == {"all_to_all_single"} and moe["all_to_all_single"] > 0  # tokens only
                planning.append(sum(regions.get("plan", {}).values()))
            assert planning == ([0] * STEPS if name == "book" else [2] + [1] * (STEPS - 2) + [0])


def test_book_for_another_layout_is_refused(setup):
    plan_path = setup["root"] / "plan.npz"
    book = DispatchPlanBook.load(book_path(plan_path))
    plan = Plan.load(plan_path)
    book.check_fits(book_key(plan, MICRO_BATCH, 2), "book")
    assert book.counts_QXMRE.shape == (plan.placement_QRM.shape[0], 1, GLOBAL_BATCH // (2 * MICRO_BATCH), 2,
                                       NUM_EXPERTS)
    assert (book.counts_QXMRE.sum(axis=(1, 2, 3, 4)) == GLOBAL_BATCH * SEQ * TOPK).all()
    for key, message in (((4, 2), "micro_batch_size=2"), ((MICRO_BATCH, 4), "dp_size=2")):
        with pytest.raises(UserError, match=message) as caught:
            book.check_fits(book_key(plan, *key), "book")
        assert "\n" not in str(caught.value)
    other = Plan(**{**vars(plan), "slot_to_expert": plan.slot_to_expert[::-1].copy()})
    with pytest.raises(UserError, match="made for plan="):
        book.check_fits(book_key(other, MICRO_BATCH, 2), "book")


def test_resume_under_another_plan_is_refused(setup, tmp_path):
    plan = Plan.load(setup["root"] / "plan.npz")
    single = {**vars(plan), "ep_size": 1, "placement_QRM": plan.placement_QRM.reshape(len(plan.placement_QRM), 1, -1)}
    first = Plan(**single).save(tmp_path / "first.npz")
    second = Plan(**{**single, "slot_to_expert": plan.slot_to_expert[::-1].copy()}).save(tmp_path / "second.npz")
    out = tmp_path / "run"
    train_in_process(train_overrides(setup, out, plan=first, extra=["train.steps=1", "train.save_interval=0"]))
    for other, needle in ((second, "this run uses plan"), (None, "this run uses no placement plan")):
        with pytest.raises(UserError, match=needle) as caught:
            train_in_process(train_overrides(setup, out, plan=other, extra=["train.steps=2"]))
        assert "trained under plan" in str(caught.value) and "\n" not in str(caught.value)
    train_in_process(train_overrides(setup, out, plan=first, extra=["train.steps=2"]))  # its own plan resumes


def test_offline_plans_on_four_ranks_two_ep_groups(setup, tmp_path):
    """DP=4 over two EP=2 groups, one sample per micro-batch: the book's replica index picks each
    group's micro-batches; losses equal the count exchange's bit for bit, no planning collective."""
    book_dir, bare = tmp_path / "book_plan", tmp_path / "bare"
    summary = plan_ep(plan_config(setup, book_dir / "plan.npz", ["dp_size=4", "train.micro_batch_size=1"]))
    assert Path(summary["book"]) == book_path(book_dir / "plan.npz")
    bare.mkdir()
    shutil.copy(book_dir / "plan.npz", bare / "plan.npz")
    layout = ["parallel=ep2_planned", "train.micro_batch_size=1", "train.steps=2"]
    for name, plan in (("book", book_dir / "plan.npz"), ("exchange", bare / "plan.npz")):
        counting_run(4, train_overrides(setup, tmp_path / name, plan=plan, extra=layout))
    assert train_losses(tmp_path / "book") == train_losses(tmp_path / "exchange")
    assert len(train_losses(tmp_path / "book")) == 2
    for name, expected in (("book", [0, 0]), ("exchange", [2, 0])):  # step 0 plans steps 0 and 1
        for steps in collectives(tmp_path / name, 4):
            assert [sum(steps[str(step)].get("plan", {}).values()) for step in range(2)] == expected
