"""EP=4 over 2 emulated nodes: default layout + megatron's alltoall vs the mg-plan-ep layout + planned.

Inputs (`prepare_inputs`): a corpus, a Grouter (a given one, or a random decisive one), its routing
cache (mg-predispatch) and an mg-plan-ep plan for EP=4 with 2 ranks per node and node-level expert
groups (with its dispatch book). Then `compare` builds an EmulatedCluster (2 network namespaces,
one tbf-shaped veth link) and, `rounds` times, trains the same mg-train run under each layout,
interleaved: 4 ranks (2 per node, gloo over TCP bound to the node's address), cached Grouter
routing, same model, data, seed and steps:
  default  — contiguous experts, samples in order, parallel.dispatcher=alltoall (megatron-core's
             MoEAlltoAllTokenDispatcher, which runs on CPU/gloo through runtime/cpu_compat.py)
  planned  — router.grouter.plan=<plan> (expert groups + sample placement), parallel.dispatcher=planned
Each rank runs ep_cluster_rank.py (mg-train with its collectives timed). While a run trains, the
link's kernel byte counters are read at every step the run logs, so bytes per step are taken over
the measured steps only (after `warmup` steps), like the step times. The table (`table_lines`)
gives step time, tokens/s, link bytes per step, per-layer all-to-all time, and the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_grouter.errors import UserError

EP_SIZE, RANKS_PER_NODE = 4, 2
LAYOUTS = ("default", "planned")


@dataclass
class ClusterSettings:
    rate_mbit: float | None = 80.0  # link rate each way; None: unshaped
    steps: int = 12
    warmup: int = 3  # steps left out of every figure (first-step setup, allocator warm-up)
    rounds: int = 2  # default, planned, default, planned, ...
    threads: int = 1  # torch threads per rank
    num_layers: int = 2
    hidden_size: int = 128
    num_experts: int = 16
    topk: int = 2
    seq_length: int = 128
    global_batch_size: int = 16
    seed: int = 1234
    split: str = "96,2,2"  # data.split (train, valid, test documents)
    timeout_s: float = 900.0
    extra: list[str] = field(default_factory=list)  # more mg-train overrides for both layouts

    @property
    def micro_batch_size(self) -> int:  # one micro-batch per rank and step: one all-to-all per direction
        return self.global_batch_size // EP_SIZE

    def model_overrides(self) -> list[str]:
        return [f"model.num_layers={self.num_layers}", f"model.hidden_size={self.hidden_size}",
                "model.num_attention_heads=4", f"model.ffn_hidden_size={2 * self.hidden_size}",
                f"model.num_experts={self.num_experts}", f"model.moe_ffn_hidden_size={self.hidden_size}",
                f"model.topk={self.topk}"]

    def train_overrides(self) -> list[str]:
        return [f"train.seq_length={self.seq_length}", f"train.global_batch_size={self.global_batch_size}",
                f"train.micro_batch_size={self.micro_batch_size}", f"train.steps={self.steps}",
                f"train.seed={self.seed}", "train.warmup_steps=2", "train.eval_interval=0",
                "train.eval_iters=1", "train.save_interval=-1", "train.resume=none", "train.log_interval=1"]


@dataclass
class Inputs:
    prefix: str
    tokenizer: str
    out_dir: str
    grouter: str
    cache: str
    plan: str = ""
    plan_ratios: dict = field(default_factory=dict)

    def data_overrides(self) -> list[str]:
        return [f"data.prefix={self.prefix}", f"data.tokenizer={self.tokenizer}", f"data.out_dir={self.out_dir}"]


def _compose_tool(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from megatron_grouter.app import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR / "tool"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def random_grouter(tokenizer: str, out_dir: Path, num_experts: int, topk: int, seed: int = 0) -> Path:
    """A random Grouter with decisive scores (as a distilled one's): routing follows the tokens."""
    import torch

    from megatron_grouter.data.tokenizer import load_tokenizer
    from megatron_grouter.grouter.checkpoint import save_grouter
    from megatron_grouter.grouter.config import GrouterConfig
    from megatron_grouter.grouter.network import Grouter

    loaded = load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    grouter = Grouter(GrouterConfig(vocab_size=loaded.vocab_size, num_experts=num_experts, topk=topk,
                                    hidden_size=32, num_layers=1, num_heads=4, max_seq_length=64, causal=True))
    with torch.no_grad():
        grouter.score.weight.mul_(50)
    save_grouter(grouter, out_dir, provenance={"source_model": f"random (ep_cluster, seed {seed})"},
                 tokenizer_fingerprint=loaded.fingerprint())
    return out_dir


def prepare_corpus(data_root: Path | None = None) -> dict:
    """The first 100 stdlib files with a 512-token BPE (a small vocabulary keeps the dense
    gradients' all-reduce small next to the token traffic), prepared once per interpreter."""
    from megatron_grouter.data.default_corpus import prepare_default_corpus

    root = data_root or Path(__file__).resolve().parents[2] / "data"
    out = root / f"stdlib-micro-py{sys.version_info.major}.{sys.version_info.minor}"
    paths = prepare_default_corpus(str(out), vocab_size=512, max_documents=100)
    return {"prefix": str(paths.prefix), "tokenizer": str(paths.tokenizer_dir), "out_dir": str(out)}


def prepare_inputs(work_dir: Path, settings: ClusterSettings, grouter: str | None = None,
                   data: dict | None = None) -> Inputs:
    """Corpus (default: the first 100 stdlib files, 512-token BPE), Grouter, routing cache, EP plan."""
    from megatron_grouter.offline.predispatch import predispatch

    work_dir.mkdir(parents=True, exist_ok=True)
    data = data or prepare_corpus()
    if grouter is None:
        grouter = str(work_dir / "grouter")
        if not (Path(grouter) / "config.json").exists():
            random_grouter(data["tokenizer"], Path(grouter), settings.num_experts, settings.topk)
    cache = work_dir / "cache"
    predispatch(_compose_tool("predispatch", [f"grouter={grouter}", f"data.prefix={data['prefix']}",
                                              f"data.tokenizer={data['tokenizer']}", f"cache={cache}",
                                              "chunk_windows=16"]))
    inputs = Inputs(data["prefix"], data["tokenizer"], data["out_dir"], str(grouter), str(cache))
    plan_ep_inputs(inputs, work_dir / "plan-ep4.npz", settings)
    return inputs


def plan_ep_inputs(inputs: Inputs, plan: Path, settings: ClusterSettings) -> None:
    """mg-plan-ep for the run: EP=4, 2 ranks per node, node-level groups, the run's micro-batches."""
    from megatron_grouter.offline.plan_ep import plan_ep

    result = plan_ep(_compose_tool("plan_ep", [
        f"grouter={inputs.grouter}", f"cache={inputs.cache}", *inputs.data_overrides(), f"data.split='{settings.split}'",
        f"train.seq_length={settings.seq_length}", f"train.global_batch_size={settings.global_batch_size}",
        f"train.seed={settings.seed}", f"train.steps={settings.steps}", "train.eval_iters=1",
        f"train.micro_batch_size={settings.micro_batch_size}", f"ep_size={EP_SIZE}", f"dp_size={EP_SIZE}",
        f"ranks_per_node={RANKS_PER_NODE}", "granularity=node", "progress=false", f"out={plan}"]))
    inputs.plan, inputs.plan_ratios = str(plan), dict(result["ratios"])


def layout_overrides(layout: str, inputs: Inputs, settings: ClusterSettings, out_dir: Path) -> list[str]:
    common = [*inputs.data_overrides(), f"data.split='{settings.split}'", *settings.model_overrides(),
              *settings.train_overrides(), "router=grouter_fixed", f"router.grouter.path={inputs.grouter}",
              "router.grouter.source=cached", f"router.grouter.cache={inputs.cache}",
              f"parallel.expert={EP_SIZE}", f"parallel.ranks_per_node={RANKS_PER_NODE}",
              "logger=default", f"train.out_dir={out_dir}", *settings.extra]
    if layout == "default":
        return [*common, "parallel.dispatcher=alltoall"]
    if layout == "planned":
        return [*common, "parallel.dispatcher=planned", f"router.grouter.plan={inputs.plan}"]
    raise UserError(f"layout {layout!r} is not one of {LAYOUTS}")


def _read_records(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    lines = metrics.read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [record for record in records if "loss" in record]


def run_layout(cluster, layout: str, inputs: Inputs, settings: ClusterSettings, out_dir: Path,
               port: int) -> dict:
    """One mg-train run of `layout` on the cluster; step marks (time, link bytes) as steps are logged."""
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-m", "megatron_grouter.reproduce.ep_cluster_rank",
            *layout_overrides(layout, inputs, settings, out_dir)]
    processes, logs = [], []
    for rank in range(EP_SIZE):
        node = rank // RANKS_PER_NODE
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(EP_SIZE), LOCAL_RANK=str(rank % RANKS_PER_NODE),
                   LOCAL_WORLD_SIZE=str(RANKS_PER_NODE), MASTER_ADDR=cluster.addresses[0], MASTER_PORT=str(port),
                   GLOO_SOCKET_IFNAME=cluster.interfaces[node], OMP_NUM_THREADS=str(settings.threads),
                   MG_COLLECTIVE_LOG=str(out_dir / "collectives"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
        log = open(out_dir / f"rank{rank}.log", "w")
        logs.append(log)
        processes.append(cluster.popen(node, argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=repo))
    marks, seen, size = [], 0, -1
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + settings.timeout_s
    try:
        while True:
            grown = metrics.exists() and metrics.stat().st_size != size
            if grown:  # read the counters right after rank 0 logs a step
                size = metrics.stat().st_size
                records = _read_records(metrics)
                if len(records) > seen:
                    marks.append({"step": records[-1]["step"], "time": time.time(), "bytes": cluster.link_bytes()})
                    seen = len(records)
            codes = [process.poll() for process in processes]
            if any(code not in (None, 0) for code in codes):
                tail = (out_dir / f"rank{codes.index(next(c for c in codes if c not in (None, 0)))}.log")
                raise RuntimeError(f"{layout} run failed; last lines of {tail}:\n"
                                   + "\n".join(tail.read_text().splitlines()[-15:]))
            if all(code == 0 for code in codes):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{layout} run exceeded {settings.timeout_s:.0f}s")
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    return summarise(layout, out_dir, marks, settings)


def summarise(layout: str, out_dir: Path, marks: list[dict], settings: ClusterSettings) -> dict:
    """Figures over the steps after `warmup`: medians of the trainer's step rates, link bytes per
    step between the first and last measured step, collectives attributed to those steps by time."""
    records = _read_records(out_dir / "metrics.jsonl")
    measured = [record for record in records if record["step"] > settings.warmup]
    if len(measured) < 2:
        raise RuntimeError(f"{layout}: {len(measured)} steps after warm-up; raise steps")
    tokens_per_step = settings.global_batch_size * settings.seq_length
    rate = statistics.median(record["tokens_per_s"] for record in measured)
    by_step = {mark["step"]: mark for mark in marks}
    first, last = by_step.get(settings.warmup), by_step.get(records[-1]["step"])
    if first is None or last is None:  # the poll missed a step's line (two steps within one poll)
        first, last = marks[min(settings.warmup, len(marks) - 2)], marks[-1]
    steps = last["step"] - first["step"]
    link = {direction: (last["bytes"][direction] - first["bytes"][direction]) / steps for direction in last["bytes"]}
    collectives = collective_times(out_dir, first["time"], last["time"], steps, settings)
    return {"layout": layout, "tokens_per_s": rate, "step_s": tokens_per_step / rate,
            "wall_step_s": (last["time"] - first["time"]) / steps, "link_bytes_per_step": sum(link.values()),
            "link_bytes_each_way": link, "losses": {record["step"]: record["loss"] for record in records},
            "marks": marks, **collectives}


def collective_times(out_dir: Path, start: float, end: float, steps: int, settings: ClusterSettings) -> dict:
    """Per rank and step: seconds in token all-to-alls, metadata collectives and the rest; the
    send matrix of one token all-to-all (rows rank i sent to rank j, averaged over the calls)."""
    per_rank, sends_RR, calls_per_rank = [], np.zeros((EP_SIZE, EP_SIZE)), []
    row_bytes = 0
    for rank in range(EP_SIZE):
        calls = json.loads((out_dir / f"collectives.rank{rank}.json").read_text())["calls"]
        window = [call for call in calls if start < call[2] <= end]
        seconds = {"alltoall_tokens": 0.0, "alltoall_metadata": 0.0, "other": 0.0}
        token_calls = 0
        for name, kind, _, took, rows in window:
            if name in ("all_to_all_single", "all_to_all") and kind == "tokens":
                seconds["alltoall_tokens"] += took
                token_calls += 1
                if rows is not None:
                    ranks, counts, width = rows
                    sends_RR[rank, ranks] += counts
                    row_bytes = max(row_bytes, width)
            elif name in ("all_to_all_single", "all_to_all", "all_gather_into_tensor", "all_gather_single",
                          "all_gather") and kind == "metadata":
                seconds["alltoall_metadata"] += took
            else:
                seconds["other"] += took
        per_rank.append({key: value / steps for key, value in seconds.items()})
        calls_per_rank.append(token_calls)
    calls = max(calls_per_rank) or 1
    return {"collectives_per_rank": per_rank, "alltoall_calls_per_step": calls / steps,
            "sends_RR_per_call": (sends_RR / calls).tolist(), "row_bytes": row_bytes,
            "alltoall_s_per_layer": statistics.mean(rank["alltoall_tokens"] for rank in per_rank)
            / settings.num_layers}


def remote_rows(sends_RR: np.ndarray) -> float:
    """Rows that cross between nodes in one all-to-all (ranks 0,1 on node 0; 2,3 on node 1)."""
    node_R = np.arange(EP_SIZE) // RANKS_PER_NODE
    return float(np.asarray(sends_RR)[node_R[:, None] != node_R[None, :]].sum())


def compare(inputs: Inputs, settings: ClusterSettings, work_dir: Path, log=print) -> dict:
    """Both layouts, `rounds` times interleaved, on one emulated cluster; medians over rounds."""
    from megatron_grouter.reproduce.emulated_cluster import EmulatedCluster
    from megatron_grouter.runtime.distributed import free_port

    runs = {layout: [] for layout in LAYOUTS}
    with EmulatedCluster(settings.rate_mbit) as cluster:
        log(f"ep-cluster: {cluster.describe()}; EP={EP_SIZE}, {RANKS_PER_NODE} ranks per node")
        for round_index in range(settings.rounds):
            for layout in LAYOUTS:
                result = run_layout(cluster, layout, inputs, settings, work_dir / f"{layout}-{round_index}",
                                    free_port())
                log(f"ep-cluster: round {round_index} {layout}: {result['step_s'] * 1e3:.0f} ms/step, "
                    f"{result['tokens_per_s']:.0f} tokens/s, {result['link_bytes_per_step'] / 1e6:.2f} MB/step "
                    f"over the link, all-to-all {result['alltoall_s_per_layer'] * 1e3:.1f} ms/layer")
                runs[layout].append(result)
        description = cluster.describe()
    return {"settings": asdict(settings), "cluster": description, "plan_ratios": inputs.plan_ratios,
            "runs": runs, "summary": {layout: _median_run(results) for layout, results in runs.items()}}


def _median_run(results: list[dict]) -> dict:
    keys = ("tokens_per_s", "step_s", "wall_step_s", "link_bytes_per_step", "alltoall_s_per_layer",
            "alltoall_calls_per_step")
    summary = {key: statistics.median(result[key] for result in results) for key in keys}
    for part in ("alltoall_tokens", "alltoall_metadata", "other"):
        summary[part + "_s_per_step"] = statistics.median(
            statistics.mean(rank[part] for rank in result["collectives_per_rank"]) for result in results)
    summary["sends_RR_per_call"] = np.mean([result["sends_RR_per_call"] for result in results], axis=0).tolist()
    summary["row_bytes"] = results[0]["row_bytes"]
    summary["remote_rows_per_call"] = remote_rows(summary["sends_RR_per_call"])
    return summary


def table_lines(result: dict) -> list[str]:
    """The comparison as a markdown table, then the ratios planned ÷ default."""
    summary, settings = result["summary"], result["settings"]
    lines = [f"EP={EP_SIZE} over 2 emulated nodes ({result['cluster']}), {RANKS_PER_NODE} ranks per node, gloo/TCP; "
             f"{settings['num_layers']} MoE layers, hidden {settings['hidden_size']}, E={settings['num_experts']} "
             f"top-{settings['topk']}, {settings['global_batch_size']}×{settings['seq_length']} tokens per step; "
             f"medians over {settings['rounds']} interleaved rounds of steps {settings['warmup'] + 1}–{settings['steps']}",
             "| layout | step ms | tokens/s | link MB/step | rows across nodes per all-to-all | token all-to-all ms/step "
             "| share of step | metadata coll. ms/step | other coll. ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"default": "default + megatron alltoall", "planned": "mg-plan-ep + planned"}
    for layout, row in summary.items():
        lines.append(f"| {names[layout]} | {row['step_s'] * 1e3:.0f} | {row['tokens_per_s']:.0f} | "
                     f"{row['link_bytes_per_step'] / 1e6:.2f} | {row['remote_rows_per_call']:.0f} | "
                     f"{row['alltoall_tokens_s_per_step'] * 1e3:.0f} | "
                     f"{row['alltoall_tokens_s_per_step'] / row['step_s']:.0%} | "
                     f"{row['alltoall_metadata_s_per_step'] * 1e3:.0f} | {row['other_s_per_step'] * 1e3:.0f} |")
    default, planned = summary["default"], summary["planned"]
    predicted = result["plan_ratios"].get("pairs_leaving_node")
    lines += ["", f"planned ÷ default: tokens/s {planned['tokens_per_s'] / default['tokens_per_s']:.3f}x, "
              f"step time {planned['step_s'] / default['step_s']:.3f}x, "
              f"link bytes {planned['link_bytes_per_step'] / default['link_bytes_per_step']:.3f}x, "
              f"rows across nodes {planned['remote_rows_per_call'] / max(default['remote_rows_per_call'], 1):.3f}x "
              f"(planner's predicted pairs leaving node: "
              + (f"{predicted:.3f}x)" if predicted is not None else "n/a)"),
              f"token all-to-all time per step {planned['alltoall_tokens_s_per_step'] / default['alltoall_tokens_s_per_step']:.3f}x"]
    runs = result.get("runs") or {}
    if len(runs.get("default", [])) > 1:  # the spread that the medians hide
        pairs = list(zip(runs["default"], runs["planned"]))
        lines.append("per round (default → planned): " + "; ".join(
            f"{d['step_s'] * 1e3:.0f} → {p['step_s'] * 1e3:.0f} ms/step, tokens/s {p['tokens_per_s'] / d['tokens_per_s']:.3f}x, "
            f"all-to-all {d['alltoall_s_per_layer'] * 1e3:.0f} → {p['alltoall_s_per_layer'] * 1e3:.0f} ms/layer"
            for d, p in pairs))
    return lines


def pipeline_stage(pipeline, grouters: dict, prefix: str, tokenizer: str) -> None:
    """mg-reproduce's optional stage (ep_cluster.enabled=true): the comparison above on the
    pipeline's corpus with its tuned Grouter and routing cache; its table goes into the report."""
    from omegaconf import OmegaConf

    from megatron_grouter.reproduce.emulated_cluster import missing_requirements

    options = OmegaConf.select(pipeline.cfg, "ep_cluster") or {}
    if not options or not options.get("enabled", False):
        pipeline.results.summaries["ep_cluster"] = {"skipped": "ep_cluster.enabled=false"}
        return
    reason = missing_requirements()
    if reason is not None:
        pipeline._say(f"stage ep_cluster: skipped ({reason})")
        pipeline.results.summaries["ep_cluster"] = {"skipped": reason}
        return
    tuned_stage, tuned_grouter = grouters["tuned"]
    manifest = json.loads((Path(grouters["cache"]) / "manifest.json").read_text())
    settings = ClusterSettings(rate_mbit=float(options.get("rate_mbit", 80.0)), steps=int(options.get("steps", 12)),
                               warmup=int(options.get("warmup", 3)), rounds=int(options.get("rounds", 2)),
                               num_experts=int(manifest["num_experts"]), topk=int(manifest["topk"]),
                               threads=int(pipeline.cfg.threads) // 2 or 1)

    def work(stage) -> dict:
        from megatron_grouter.reproduce.ep_cluster_model import calibrate, calibration_lines

        inputs = Inputs(prefix, tokenizer, str(Path(prefix).parent), str(tuned_grouter), str(grouters["cache"]))
        plan_ep_inputs(inputs, stage.directory / "plan-ep4.npz", settings)
        result = compare(inputs, settings, stage.directory / "runs", log=pipeline._say)
        calibration = calibrate(result["summary"], settings.rate_mbit, settings.hidden_size, settings.num_layers)
        return {"table": table_lines(result) + [""] + calibration_lines(calibration),
                "summary": result["summary"], "plan_ratios": result["plan_ratios"]}

    pipeline._stage("ep_cluster", asdict(settings), [tuned_stage], work,
                    "stage ep_cluster: EP=4 over 2 emulated nodes, default vs planned layout (optional)")


def report_lines(summaries: dict) -> list[str]:
    """The stage's table for the mg-reproduce report (nothing when the stage did not run)."""
    done = summaries.get("ep_cluster") or {}
    if done.get("table"):
        return ["", "## Expert parallelism over 2 emulated nodes (ep_cluster stage)", "", *done["table"]]
    if done.get("skipped") and done["skipped"] != "ep_cluster.enabled=false":
        return ["", f"EP over 2 emulated nodes: skipped ({done['skipped']})."]
    return []
