"""The experiment's stages in order, each cached by fingerprint (see stages.py).

data → source → distill → fold (only when the target's expert count differs) → tune →
predispatch → plan (optional) → target runs (every router × seed, same data order and token
budget) → stability probe → report. Progress lines name the stage and the run.

The Grouter is distilled causal (grouter.causal=true): every Grouter row routes token t from
tokens <= t. When target.routers holds grouter_tuned_bidirectional, a second chain
(distill-bidirectional → fold → tune → predispatch) builds the paper's bidirectional encoder for
that one labelled row. Each grouter_tuned_<variant> in target.routers gets its own tune →
predispatch chain from the causal raw Grouter with the mg-tune overrides `tune.variants.<variant>`
(another tuning objective, compared by the target runs' validation loss). grouter_random (a
control) gets distill-random (the same student shape, zero distillation steps: random weights) →
tune-random (the same tuning as grouter_tuned).

The offline tools learn only from the target LM's train documents: distillation and tuning get
data.lm_split = the target's data.split (data/lm_split.py), and mg-train's hash table counts the
same documents.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from megatron_grouter.errors import UserError
from megatron_grouter.reproduce import ep_cluster_stage
from megatron_grouter.reproduce.jobs import check_launcher, run_job
from megatron_grouter.reproduce.routers import (BIDIRECTIONAL, GROUTER_RUNS, RANDOM, is_learned,
                                                missing_variant, router_overrides, tuned_variant)
from megatron_grouter.reproduce.stages import Stage, write_json_atomic


@dataclass
class TargetRun:
    """One training of the target model: its router, seed and run directory."""

    router: str
    seed: int
    directory: Path
    key: str = ""

    @property
    def name(self) -> str:
        return f"{self.router}-s{self.seed}"


@dataclass
class Results:
    """What the report needs: the target runs and the stage summaries."""

    out_dir: Path
    runs: list[TargetRun] = field(default_factory=list)
    summaries: dict[str, dict] = field(default_factory=dict)
    stability_file: Path | None = None


class Pipeline:
    def __init__(self, cfg: DictConfig):
        check_launcher(cfg.launcher)
        self.parallel_runs = int(cfg.get("parallel_runs", 1))
        if self.parallel_runs < 1:
            raise UserError(f"parallel_runs={self.parallel_runs} must be >= 1 (target runs trained at once)")
        if self.parallel_runs > 1 and cfg.launcher != "subprocess":
            raise UserError(f"parallel_runs={self.parallel_runs} needs launcher=subprocess (in_process jobs share "
                            "one interpreter, torchrun jobs take the whole node); set parallel_runs=1")
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.results = Results(self.out_dir)
        self.started = time.perf_counter()
        # The offline tools keep to the target LM's train documents (data/lm_split.py).
        self.lm_split = str(compose_target(self._list("target.overrides")).data.split)
        grouter_source = str(OmegaConf.select(cfg, "target.grouter_source") or "cached")
        if grouter_source not in ("cached", "online"):
            raise UserError(f"target.grouter_source={grouter_source!r}; use cached (predispatch the corpus once) "
                            "or online (each target run routes with the Grouter)")
        self.online = grouter_source == "online"

    # ------------------------------------------------------------------ plumbing
    def _stage(self, name: str, settings: dict, upstream: list[Stage],
               work: Callable[[Stage], dict], label: str | None = None) -> tuple[Stage, dict]:
        stage = Stage(name, self.out_dir / "stages" / name, settings, [item.key for item in upstream])
        label = label or name
        done = stage.finished()
        if done is not None:
            self._say(f"{label}: cached ({stage.key[:10]}), skipped")
        else:
            state = stage.begin()
            self._say(f"{label}: {'resuming' if state == 'resume' else 'running'} in {stage.directory}"
                      + (" (settings changed: started over)" if state == "reset" else ""))
            began = time.perf_counter()
            done = dict(work(stage), seconds=round(time.perf_counter() - began, 1))
            stage.finish(done)
            self._say(f"{label}: finished in {done['seconds']:.0f} s")
        self.results.summaries[name] = done
        return stage, done

    def _say(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"== [{elapsed / 60:5.1f} min] {text}", flush=True)

    def _job(self, tool: str, args: list[str], stage: Stage, label: str) -> None:
        run_job(tool, args, label, stage.directory / "log.txt", self.cfg.launcher, self.cfg.threads,
                int(self.cfg.nproc_per_node))

    def _list(self, key: str) -> list[str]:
        return _as_list(OmegaConf.select(self.cfg, key), key)

    # ------------------------------------------------------------------ stages
    def run(self) -> Results:
        prefix, tokenizer = self.prepare_data()
        train_data = [f"data.prefix={prefix}", f"data.tokenizer={tokenizer}",
                      f"data.out_dir={Path(prefix).parent}"]
        data_stage = Stage("data", self.out_dir, {"prefix": prefix, "tokenizer": tokenizer,
                                                  "dataset": _dataset_identity(prefix)})
        source = self.source_stage(data_stage, train_data)
        raw_stage, raw_grouter, cache_stage, tuned_grouter, cache = self.grouter_chain(
            source, prefix, tokenizer, causal=True)
        self.plan_stage(cache_stage, cache, prefix)
        grouters = {"raw": (raw_stage, raw_grouter), "tuned": (cache_stage, tuned_grouter), "cache": cache,
                    "variants": self.tuned_variants(raw_stage, raw_grouter, prefix, tokenizer)}
        if BIDIRECTIONAL in self._list("target.routers"):
            _, _, bidirectional_stage, bidirectional_grouter, bidirectional_cache = self.grouter_chain(
                source, prefix, tokenizer, causal=False)
            grouters["bidirectional"] = (bidirectional_stage, bidirectional_grouter, bidirectional_cache)
        if RANDOM in self._list("target.routers"):
            grouters["random"] = self.random_chain(source, prefix, tokenizer)
        self.target_stages(data_stage, train_data, grouters)
        self.planned_run_stage(train_data, grouters)
        ep_cluster_stage.pipeline_stage(self, grouters, prefix, tokenizer)  # optional: ep_cluster.enabled
        self.stability_stage(prefix)
        return self.results

    def prepare_data(self) -> tuple[str, str]:
        """(dataset prefix, tokenizer), absolute: resolved against the caller's directory, so the
        stage keys name the data itself whatever directory a job runs in."""
        data = self.cfg.data
        if data.prefix and data.get("corpus"):
            raise UserError(f"data.prefix and data.corpus are both set; give one: an indexed dataset (with "
                            f"data.tokenizer) or a corpus to preprocess ({data.corpus})")
        if data.prefix:
            if not data.tokenizer:
                raise UserError("data.prefix is set but data.tokenizer is not; give the tokenizer the "
                                "dataset was made with")
            return str(Path(data.prefix).absolute()), str(Path(data.tokenizer).absolute())
        from megatron_grouter.data.corpus import STDLIB
        from megatron_grouter.data.default_corpus import prepare_corpus

        corpus = str(data.get("corpus") or STDLIB)
        shown = "the built-in corpus" if corpus == STDLIB else f"corpus {corpus}"
        self._say(f"data: {shown} in {data.out_dir} (prepared once, then reused)")
        paths = prepare_corpus(corpus, str(data.out_dir), vocab_size=int(data.vocab_size),
                               tokenizer=data.tokenizer or None, max_documents=data.max_documents,
                               jsonl_key=str(data.get("text_field") or "text"), suffixes=data.get("suffixes"))
        return str(Path(paths.prefix).absolute()), str(Path(paths.tokenizer_dir).absolute())

    def source_stage(self, data_stage: Stage, train_data: list[str]) -> Stage | None:
        if self.cfg.source.hf_path:
            return None
        args = [*train_data, *self._list("source.overrides")]

        def work(stage: Stage) -> dict:
            self._job("train", [*args, f"train.out_dir={stage.directory}"], stage, "source")
            return {"run": str(stage.directory)}
        stage, _ = self._stage("source", {"args": args}, [data_stage], work,
                               "stage source: train the source MoE")
        return stage

    def grouter_chain(self, source: Stage | None, prefix: str, tokenizer: str, causal: bool):
        """distill → fold → tune → predispatch of one Grouter variant: (raw stage, raw Grouter,
        cache stage, tuned Grouter, cache). The bidirectional variant's stages are suffixed."""
        suffix = "" if causal else "-bidirectional"
        distill, distill_summary = self.distill_stage(source, prefix, tokenizer, causal, suffix)
        raw_stage, raw_grouter = self.fold_stage(distill, Path(distill_summary["grouter"]), prefix, suffix)
        tune, tuned_grouter = self.tune_stage(raw_stage, raw_grouter, prefix, suffix, self._list("tune.objective"))
        if self.online:
            return raw_stage, raw_grouter, tune, tuned_grouter, None
        cache_stage, cache = self.predispatch_stage(tune, tuned_grouter, prefix, tokenizer, suffix)
        return raw_stage, raw_grouter, cache_stage, tuned_grouter, cache

    def random_chain(self, source: Stage | None, prefix: str, tokenizer: str) -> tuple[Stage, Path]:
        """The grouter_random control: the causal student with zero distillation steps (its random
        initialisation, seeded), folded like the distilled one when the expert counts differ, tuned like
        grouter_tuned; (tune stage, tuned Grouter)."""
        distill, summary = self.distill_stage(source, prefix, tokenizer, True, "-random", ["train.steps=0"])
        raw_stage, raw_grouter = self.fold_stage(distill, Path(summary["grouter"]), prefix, "-random")
        tune, grouter = self.tune_stage(raw_stage, raw_grouter, prefix, "-random", self._list("tune.objective"))
        return tune, grouter

    def tuned_variants(self, raw_stage: Stage, raw_grouter: Path, prefix: str,
                       tokenizer: str) -> dict[str, tuple[Stage, Path, Path]]:
        """router → (cache stage, tuned Grouter, cache) of every grouter_tuned_<variant> in
        target.routers, each tuned from the causal raw Grouter with tune.variants.<variant>."""
        variants = {}
        declared = OmegaConf.select(self.cfg, "tune.variants") or {}
        for router in self._list("target.routers"):
            name = tuned_variant(router)
            if name is None:
                continue
            if name not in declared:
                raise missing_variant(router)
            tune, grouter = self.tune_stage(raw_stage, raw_grouter, prefix, f"-{name}",
                                            _as_list(declared[name], f"tune.variants.{name}"))
            if self.online:
                variants[router] = (tune, grouter, None)
                continue
            cache_stage, cache = self.predispatch_stage(tune, grouter, prefix, tokenizer, f"-{name}")
            variants[router] = (cache_stage, grouter, cache)
        return variants

    def distill_stage(self, source: Stage | None, prefix: str, tokenizer: str, causal: bool = True,
                      suffix: str = "", extra: list[str] | None = None) -> tuple[Stage, dict]:
        if source is None:
            kind, path = "hf", str(Path(self.cfg.source.hf_path).absolute())
            if not Path(path).is_dir():
                raise UserError(f"source.hf_path={path} is not a directory; point it at a local "
                                "Hugging Face MoE checkpoint or set source.hf_path=null")
        else:
            kind, path = "megatron", str(source.directory)
        # The causal flag goes before the user's overrides (they may change it: the target run then
        # refuses a bidirectional Grouter, or labels it), and after them for the bidirectional row.
        overrides = [*self._list("distill.overrides"), *(extra or [])]
        args = [f"source.kind={kind}", f"source.path={path}", f"data.prefix={prefix}",
                f"data.tokenizer={tokenizer}", f"data.lm_split='{self.lm_split}'",
                *(["grouter.causal=true", *overrides] if causal else [*overrides, "grouter.causal=false"])]

        def work(stage: Stage) -> dict:
            self._job("distill", [*args, f"out_dir={stage.directory}"], stage, "distill" + suffix)
            return {"grouter": str(stage.directory / "grouter"), **_last_distill_eval(stage.directory)}
        kind_text = ("randomly initialised (control)" if suffix == "-random" else "causal" if causal
                     else "bidirectional (paper-fidelity row, sees future tokens)")
        return self._stage("distill" + suffix, {"args": args}, [source] if source else [], work,
                           f"stage distill{suffix}: a {kind_text} Grouter from the source's first MoE layer")

    def fold_stage(self, distill: Stage, grouter: Path, prefix: str, suffix: str = "") -> tuple[Stage, Path]:
        from megatron_grouter.grouter.checkpoint import read_grouter_header

        header = read_grouter_header(grouter)
        target = compose_target(self._list("target.overrides"))
        if header["architecture"]["topk"] != target.model.topk:
            raise UserError(f"the Grouter routes top-{header['architecture']['topk']} but the target "
                            f"model uses top-{target.model.topk}; make the source and target top-k equal")
        source_experts, target_experts = int(header["num_experts"]), target.model.num_experts
        if source_experts == target_experts:
            self._say(f"stage fold{suffix}: skipped (source and target both have {target_experts} experts)")
            self.results.summaries["fold" + suffix] = {"skipped": f"same expert count ({target_experts})"}
            return distill, grouter
        fold = self.cfg.fold
        settings = {"num_experts": target_experts, "strategy": fold.strategy,
                    "affinity_tokens": fold.affinity_tokens, "prefix": prefix}

        def work(stage: Stage) -> dict:
            affinity = stage.directory / "affinity"
            self._job("affinity", [f"grouter={grouter}", f"data.prefix={prefix}",
                                   f"max_tokens={fold.affinity_tokens}", f"out={affinity}"],
                      stage, f"fold{suffix}/affinity")
            self._job("fold", [f"grouter={grouter}", f"affinity={affinity}",
                               f"num_experts={target_experts}", f"strategy={fold.strategy}",
                               f"out={stage.directory / 'grouter'}"], stage, "fold" + suffix)
            return {"grouter": str(stage.directory / "grouter"), "from_experts": source_experts,
                    "to_experts": target_experts}
        stage, summary = self._stage("fold" + suffix, settings, [distill], work,
                                     f"stage fold{suffix}: {source_experts} → {target_experts} experts")
        return stage, Path(summary["grouter"])

    def tune_stage(self, upstream: Stage, grouter: Path, prefix: str, suffix: str = "",
                   extra: list[str] | None = None) -> tuple[Stage, Path]:
        args = [f"grouter={grouter}", f"data.prefix={prefix}", f"data.lm_split='{self.lm_split}'",
                *self._list("tune.overrides"), *(extra or [])]

        def work(stage: Stage) -> dict:
            self._job("tune", [*args, f"out={stage.directory / 'grouter'}"], stage, "tune" + suffix)
            return {"grouter": str(stage.directory / "grouter"), **_tune_record(stage.directory / "grouter")}
        stage, summary = self._stage("tune" + suffix, {"args": args}, [upstream], work,
                                     f"stage tune{suffix}: rebalance the Grouter on the target data")
        return stage, Path(summary["grouter"])

    def predispatch_stage(self, tune: Stage, grouter: Path, prefix: str,
                          tokenizer: str, suffix: str = "") -> tuple[Stage, Path]:
        args = [f"grouter={grouter}", f"data.prefix={prefix}", f"data.tokenizer={tokenizer}"]

        def work(stage: Stage) -> dict:
            self._job("predispatch", [*args, f"cache={stage.directory / 'cache'}"], stage, "predispatch" + suffix)
            return {"cache": str(stage.directory / "cache")}
        stage, summary = self._stage("predispatch" + suffix, {"args": args}, [tune], work,
                                     f"stage predispatch{suffix}: route the target corpus once")
        return stage, Path(summary["cache"])

    def plan_stage(self, cache_stage: Stage, cache: Path, prefix: str) -> None:
        from megatron_grouter.reproduce.plan_step import plan_volumes, planner_available

        plan = self.cfg.plan
        if not plan.enabled:
            self.results.summaries["plan"] = {"skipped": "plan.enabled=false"}
            return
        if cache is None:
            self.results.summaries["plan"] = {"skipped": "no routing cache (target.grouter_source=online)"}
            return
        if not planner_available():
            self._say("stage plan: skipped (the EP planner is not importable here)")
            self.results.summaries["plan"] = {"skipped": "planner not importable"}
            return
        target = compose_target(self._list("target.overrides"))
        settings = {"ep_size": plan.ep_size, "samples": plan.samples,
                    "seq_length": target.train.seq_length, "global_batch": target.train.global_batch_size}

        def work(stage: Stage) -> dict:
            return plan_volumes(cache, prefix, target.model.num_experts, stage.directory, **settings)
        self._stage("plan", settings, [cache_stage], work, "stage plan: EP placement volumes (optional)")

    def planned_run_stage(self, train_data: list[str], grouters: dict) -> None:
        """plan.train_ep: grouter_tuned at EP=2 under an mg-plan-ep plan (reproduce/planned_run.py)."""
        from megatron_grouter.reproduce import planned_run

        if not (self.cfg.plan.enabled and self.cfg.plan.get("train_ep", False)):
            return
        seed = int(self.cfg.seeds[0])
        target = compose_target(self._list("target.overrides"))
        args = [*train_data, *self._list("target.overrides"),
                *router_overrides("grouter_tuned", grouters["raw"][1], grouters["tuned"][1], grouters["cache"]),
                f"train.seed={seed}", "parallel=ep2_planned", "parallel.verify_dispatch_plan=true",
                "parallel.ranks_per_node=1", f"train.micro_batch_size={planned_run.micro_batch_size(target)}"]

        def work(stage: Stage) -> dict:
            plan = stage.directory / "plan.npz"
            self._job("plan_ep", planned_run.plan_ep_args(target, train_data, grouters["tuned"][1],
                                                          grouters["cache"], seed, plan), stage, "plan-ep")
            run_dir = stage.directory / "run"
            run_job("train", [*args, f"router.grouter.plan={plan}", f"train.out_dir={run_dir}"], "planned EP=2",
                    stage.directory / "log.txt", "torchrun", self.cfg.threads, planned_run.EP_SIZE)
            from megatron_grouter.placement.plan import Plan

            return planned_run.run_summary(run_dir, Plan.load(plan).stats)
        self._stage("planned_ep", {"args": args}, [grouters["tuned"][0]], work,
                    "stage planned EP: grouter_tuned at EP=2 under the plan (2 processes)")

    def target_stages(self, data_stage: Stage, train_data: list[str], grouters: dict) -> None:
        """Every router on the first seed; on later seeds every router not in first_seed_only,
        plus the first seed's best baseline (so each seed's headline has the strongest rival)."""
        from megatron_grouter.reproduce.metrics import best_run, read_run
        from megatron_grouter.reproduce.routers import is_baseline

        routers = self._list("target.routers")
        seeds = [int(seed) for seed in self.cfg.seeds]
        if not routers or not seeds:
            raise UserError("target.routers and seeds must both be non-empty lists")
        first_only = set(self._list("first_seed_only"))
        self.run_targets([(router, seeds[0], f"seed {seeds[0]}, run {number}/{len(routers)}")
                          for number, router in enumerate(routers, 1)], data_stage, train_data, grouters)
        baselines = {run.router: read_run(run.directory) for run in self.results.runs
                     if is_baseline(run.router)}
        best = best_run(baselines) if baselines else None
        later = [router for router in routers if router not in first_only or router == best]
        self.run_targets([(router, seed, f"seed {seed}, run {number}/{len(later)}")
                          for seed in seeds[1:] for number, router in enumerate(later, 1)],
                         data_stage, train_data, grouters)

    def run_targets(self, specs: list[tuple[str, int, str]], data_stage: Stage, train_data: list[str],
                    grouters: dict) -> None:
        """Train (router, seed, position) runs, `parallel_runs` at a time (each its own process with
        `threads` threads); results keep the order of `specs`. A failure is raised once the runs
        already started have finished (their stages stay complete for the rerun)."""
        def one(spec):
            router, seed, position = spec
            return self.target_run(router, seed, position, data_stage, train_data, grouters)
        if self.parallel_runs == 1 or len(specs) < 2:
            self.results.runs.extend(one(spec) for spec in specs)
            return
        with ThreadPoolExecutor(max_workers=self.parallel_runs, thread_name_prefix="target-run") as pool:
            futures = [pool.submit(one, spec) for spec in specs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [future for future in done if future.exception() is not None]
            if failed:
                for future in futures:
                    future.cancel()
                raise failed[0].exception()
        self.results.runs.extend(future.result() for future in futures)

    def target_run(self, router: str, seed: int, position: str, data_stage: Stage,
                   train_data: list[str], grouters: dict) -> TargetRun:
        upstream = [data_stage]
        if router == BIDIRECTIONAL:
            upstream = [grouters["bidirectional"][0]]
        elif router in grouters["variants"]:
            upstream = [grouters["variants"][router][0]]
        elif router == RANDOM:
            upstream = [grouters["random"][0]]
        elif router in GROUTER_RUNS:
            upstream = [grouters["raw"][0] if router == "grouter_raw" else grouters["tuned"][0]]
        bidirectional = grouters["bidirectional"][1:] if "bidirectional" in grouters else None
        variants = {name: (grouter, cache) for name, (_, grouter, cache) in grouters["variants"].items()}
        args = [*train_data, *self._list("target.overrides"),
                *router_overrides(router, grouters["raw"][1], grouters["tuned"][1], grouters["cache"],
                                  bidirectional, variants, grouters["random"][1] if "random" in grouters else None,
                                  int(OmegaConf.select(self.cfg, "target.warm_tokens") or 0)),
                f"train.seed={seed}"]
        interval = int(self.cfg.target.checkpoint_interval)
        if interval > 0 and seed == int(self.cfg.seeds[0]) and is_learned(router):
            args.append(f"train.save_interval={interval}")
        run = TargetRun(router, seed, self.out_dir / "stages" / f"target-{router}-s{seed}")

        def work(stage: Stage) -> dict:
            self._job("train", [*args, f"train.out_dir={stage.directory}"], stage, run.name)
            return {"run": str(stage.directory)}
        stage, _ = self._stage(f"target-{router}-s{seed}", {"args": args}, upstream, work,
                               f"stage target run ({position}): {router}")
        run.key = stage.key
        return run

    def stability_stage(self, prefix: str) -> None:
        seed = int(self.cfg.seeds[0])
        runs = [run for run in self.results.runs if run.seed == seed and is_learned(run.router)]
        if int(self.cfg.target.checkpoint_interval) <= 0 or not runs:
            self.results.summaries["stability"] = {"skipped": "no learned-router run keeps checkpoints"}
            return
        probe_settings = {"sequences": int(self.cfg.probe.sequences), "prefix": prefix}
        settings = {"runs": [run.name for run in runs], **probe_settings}
        upstream_keys = [run.key for run in runs]

        def work(stage: Stage) -> dict:
            # Each run keeps its own probe result (its directory is emptied when its key changes):
            # a run whose checkpoints were pruned after an earlier probe is not probed again.
            results, missing = {}, []
            for run in runs:
                kept = _read_json(run.directory / "stability.json")
                if kept and kept.get("settings") == probe_settings:
                    results.update(kept["result"])
                else:
                    missing.append(run)
            if missing:
                fresh_file = stage.directory / "probed.json"
                args = [arg for run in missing for arg in ("--run", str(run.directory))]
                self._job("probe", [*args, "--prefix", prefix, "--sequences", str(self.cfg.probe.sequences),
                                    "--out", str(fresh_file)], stage, "probe")
                fresh = json.loads(fresh_file.read_text())
                for run in missing:
                    name = run.directory.name
                    write_json_atomic(run.directory / "stability.json",
                                      {"settings": probe_settings, "result": {name: fresh[name]}})
                    if not self.cfg.probe.keep_checkpoints:
                        prune_checkpoints(run.directory)
                results.update(fresh)
            out = stage.directory / "stability.json"
            write_json_atomic(out, {run.directory.name: results[run.directory.name] for run in runs})
            return {"file": str(out)}
        _, summary = self._stage("stability", {**settings, "runs_keys": upstream_keys}, [], work,
                                 "stage stability: route a probe batch with every checkpoint")
        self.results.stability_file = Path(summary["file"])


def compose_target(overrides: list[str]):
    """The target run's mg-train config (to read its expert count, top-k, batch shape)."""
    from megatron_grouter.reproduce.jobs import compose_config
    from megatron_grouter.training.config import to_train_config

    return to_train_config(compose_config(".", "config", overrides))


def prune_checkpoints(run_dir: Path) -> None:
    """Keep only a run's newest complete checkpoint (enough to resume or extend it)."""
    from megatron_grouter.training.checkpoint import find_latest

    root = run_dir / "checkpoints"
    latest = find_latest(root)
    for path in root.glob("step_*"):
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def _as_list(value, key: str) -> list[str]:
    """A config list of overrides/names as strings; a bare string would be split into characters."""
    if value is None:
        return []
    if isinstance(value, str):
        raise UserError(f"{key}={value!r} must be a list, e.g. {key}=[{value}] (quote items that contain '=': "
                        f"'{key}=[\"{value}\"]')")
    return [str(item) for item in value]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _dataset_identity(prefix: str) -> dict:
    """Size and modification time of the dataset's files: changes when the corpus does."""
    identity = {}
    for suffix in (".bin", ".idx"):
        path = Path(prefix + suffix)
        if not path.is_file():
            raise UserError(f"dataset {prefix} has no {suffix} file; preprocess it with mg-preprocess "
                            "or set data.prefix=null for the built-in corpus")
        identity[suffix] = [path.stat().st_size, int(path.stat().st_mtime)]
    return identity


def _last_distill_eval(directory: Path) -> dict:
    path = directory / "distill_metrics.jsonl"
    evals = [json.loads(line) for line in path.read_text().splitlines()
             if line.strip() and "eval_topk_overlap" in line] if path.is_file() else []
    if not evals:
        return {}
    last = evals[-1]
    return {key: last[key] for key in ("eval_kl", "eval_topk_overlap", "eval_exact_match", "step")
            if key in last}


def _tune_record(grouter: Path) -> dict:
    from megatron_grouter.grouter.checkpoint import read_grouter_header

    history = read_grouter_header(grouter).get("provenance", {}).get("history", [])
    record = history[-1] if history else {}
    return {key: record[key] for key in ("objective", "before", "after", "tokens", "stopped_by", "stop_max_vio")
            if key in record}
