"""report.md (+ summary.json and PNG figures) from the target runs' metrics files.

Per seed, the best baseline is the baseline run with the lowest final validation loss, and the
best learned baseline the best of those whose router learns (all but the fixed hash); every
Grouter run is compared with both (data efficiency, loss gap at equal tokens). The headline is the
tuned Grouter's data efficiency against the best learned baseline over the seeds (the bar of
TARGET_RATIO), with its spread, whether it was ahead at every evaluation on every seed, and the
same against the best baseline of all.

Every row of a run whose routing saw future tokens (a bidirectional Grouter trained with
router.grouter.allow_future_context=true, e.g. grouter_tuned_bidirectional) says so in its name:
its validation loss is not comparable with causal routers'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_grouter.atomic_files import write_text_atomic
from megatron_grouter.reproduce import metrics as m
from megatron_grouter.reproduce import plots
from megatron_grouter.reproduce.routers import BIDIRECTIONAL, TUNED_VARIANT_PREFIX, is_baseline, is_grouter, is_learned
from megatron_grouter.reproduce.stages import write_json_atomic

CV_WINDOWS = (50, 500)
HEADLINE = "grouter_tuned"
FUTURE_LABEL = " (sees future tokens)"
TARGET_RATIO = 1.3  # the causal re-measure's bar (issue 14): data efficiency on every seed


def _fmt(value, pattern: str = "{:.3f}", missing: str = "n/a") -> str:
    return missing if value is None else pattern.format(value)


def compare_seed(runs: dict[str, m.RunMetrics]) -> dict:
    """Best baseline and best learned baseline of one seed, and every Grouter run's comparison
    with each (`comparisons`, `comparisons_learned`; the same when the best baseline learns)."""
    baselines = {name: run for name, run in runs.items() if is_baseline(name)}
    best = m.best_run(baselines)
    learned = {name: run for name, run in baselines.items() if is_learned(name)}
    best_learned = m.best_run(learned) if learned else best

    def against(reference: str) -> dict:
        return {name: {"efficiency": m.data_efficiency(baselines[reference], run),
                       "gap": m.loss_gap(baselines[reference], run)}
                for name, run in runs.items() if is_grouter(name)}
    comparisons = against(best)
    return {"best_baseline": best, "best_learned_baseline": best_learned, "baselines": sorted(baselines),
            "comparisons": comparisons,
            "comparisons_learned": comparisons if best_learned == best else against(best_learned)}


def label(name: str, row: dict) -> str:
    """A run's name as the report shows it: labelled when its routing saw future tokens."""
    return name + (FUTURE_LABEL if row.get("sees_future_tokens") else "")


def run_row(run: m.RunMetrics) -> dict:
    return {"final_val_loss": float(run.val_loss[-1]), "tokens": float(run.tokens[-1]),
            "sees_future_tokens": m.sees_future_tokens(run),
            "max_vio": m.max_vio(run), "max_vio_first_tenth": m.max_vio(run, first_fraction=0.1),
            "tokens_per_s": m.throughput(run),
            "expert_bias_change": m.mean_series(run, "moe/expert_bias_change"),
            "expert_bias_abs": m.last_value(run, "moe/expert_bias_abs"),
            **{f"grad_norm_cv_{window}": m.grad_norm_cv(run, window) for window in CV_WINDOWS},
            "steps": len(run.steps)}


def headline(per_seed: dict[int, dict], against: str = "comparisons_learned") -> dict:
    ratios, ahead, missing = [], [], []
    for seed, record in per_seed.items():
        comparison = record[against].get(HEADLINE)
        if comparison is None:
            missing.append(seed)
            continue
        ratios.append(comparison["efficiency"]["ratio"])
        ahead.append(comparison["gap"]["ahead_everywhere"])
    reached = [ratio for ratio in ratios if ratio is not None]
    return {"seeds": [seed for seed in per_seed if seed not in missing], "ratios": ratios,
            "mean": float(np.mean(reached)) if reached else None,
            "min": min(reached) if reached else None, "max": max(reached) if reached else None,
            "std": float(np.std(reached, ddof=1)) if len(reached) > 1 else None,
            "all_reached": bool(ratios) and len(reached) == len(ratios),
            "ahead_everywhere_all_seeds": bool(ahead) and all(ahead),
            "meets_ratio_target": bool(reached) and len(reached) == len(ratios)
            and min(reached) >= TARGET_RATIO}


def write_report(out_dir: Path, runs: dict[tuple[str, int], Path], summaries: dict,
                 stability_file: Path | None, preset: dict) -> Path:
    """Read every run's metrics, draw the figures, write report.md and summary.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = {key: m.read_run(path, key[0]) for key, path in runs.items()}
    loaded = {key: run for key, run in loaded.items() if len(run.evals)}
    seeds = sorted({seed for _, seed in loaded})
    per_seed = {seed: compare_seed({router: run for (router, s), run in loaded.items() if s == seed})
                for seed in seeds}
    rows = {f"{router}-s{seed}": run_row(run) for (router, seed), run in sorted(loaded.items())}
    top = headline(per_seed)
    top["against_all_baselines"] = headline(per_seed, "comparisons")
    top["sees_future_tokens"] = any(rows.get(f"{HEADLINE}-s{seed}", {}).get("sees_future_tokens")
                                    for seed in top["seeds"])
    stability = json.loads(stability_file.read_text()) if stability_file and stability_file.is_file() else {}

    figures = {"loss_curves": plots.loss_curves(loaded, out_dir / "loss_curves.png"),
               "maxvio_vs_loss": plots.maxvio_vs_loss(
                   [(name, row["max_vio"], row["final_val_loss"]) for name, row in rows.items()
                    if row["max_vio"] is not None], out_dir / "maxvio_vs_loss.png"),
               "grad_norm_cv": plots.grad_norm_cv(
                   [(name, row["grad_norm_cv_50"], row["grad_norm_cv_500"]) for name, row in rows.items()],
                   out_dir / "grad_norm_cv.png", CV_WINDOWS)}
    if stability:
        figures["routing_stability"] = plots.routing_stability(stability, out_dir / "routing_stability.png")

    summary = {"preset": preset, "headline": top, "runs": rows, "per_seed": per_seed,
               "stages": summaries, "stability": stability}
    write_json_atomic(out_dir / "summary.json", summary)
    text = render(preset, top, per_seed, rows, summaries, stability, figures)
    write_text_atomic(out_dir / "report.md", text)
    return out_dir / "report.md"


def tuned_router(stage: str) -> str:
    """The target router trained with the Grouter of a tune stage (tune, tune-<variant>, ...)."""
    if stage == "tune":
        return "grouter_tuned"
    if stage == "tune-bidirectional":
        return BIDIRECTIONAL
    return TUNED_VARIANT_PREFIX + stage[len("tune-"):]


def tuning_section(summaries: dict, rows: dict) -> list[str]:
    """Each tuning objective: held-out MaxVioGlobal and top-k agreement with the distilled Grouter,
    and the final validation loss of the target run it routed (the objective's real test)."""
    stages = [name for name in summaries if name == "tune" or name.startswith("tune-")]
    if not stages:
        return []
    lines = ["## Tuning objectives", "",
             "| Grouter run | objective | stopped by | tokens | held-out MaxVioGlobal before → after | "
             "top-k agreement with the distilled Grouter | final val loss per seed |",
             "|---|---|---|---|---|---|---|"]
    for stage in stages:
        summary, router = summaries[stage], tuned_router(stage)
        before, after = summary.get("before") or {}, summary.get("after") or {}
        losses = ", ".join(f"s{name.rsplit('-s', 1)[1]}: {row['final_val_loss']:.4f}"
                           for name, row in rows.items() if name.rsplit("-s", 1)[0] == router) or "not trained"
        shown = label(router, next((row for name, row in rows.items() if name.rsplit("-s", 1)[0] == router), {}))
        lines.append(f"| {shown} | {summary.get('objective', 'n/a')} | {summary.get('stopped_by', 'n/a')} | "
                     f"{_fmt(summary.get('tokens'), '{:,.0f}')} | {_fmt(before.get('max_vio_global'))} → "
                     f"{_fmt(after.get('max_vio_global'))} | {_fmt(after.get('topk_agreement'))} | {losses} |")
    lines += ["", "Held-out windows (not seen by tuning). Agreement: share of the tuned Grouter's top-k experts "
              "that the distilled (untuned) Grouter also picks. The default objective is the one whose target "
              "run reaches the lowest validation loss.", ""]
    return lines


def render(preset: dict, top: dict, per_seed: dict, rows: dict, summaries: dict, stability: dict,
           figures: dict) -> str:
    lines = [f"# Grouter reproduction — preset `{preset.get('name')}`", ""]
    lines += [f"Written by `mg-reproduce experiment={preset.get('name')}`. {preset.get('note', '')}".strip(), ""]
    if preset.get("minutes") is not None:
        lines += [f"This invocation took {preset['minutes']:.1f} minutes of wall time (stages it found finished were "
                  "skipped; per-stage seconds are listed under Pipeline).", ""]
    lines += ["## Headline", ""]
    ratios = ", ".join(f"seed {seed}: {_fmt(ratio, '{:.2f}×', 'not reached')}"
                       for seed, ratio in zip(top["seeds"], top["ratios"]))
    lines.append(f"- Data efficiency of `{HEADLINE}` against the best learned baseline of each seed: {ratios or 'n/a'}"
                 + (f"; mean {top['mean']:.2f}× (min {top['min']:.2f}×, max {top['max']:.2f}×"
                    + (f", std {top['std']:.2f}" if top["std"] is not None else "") + ")" if top["mean"] else ""))
    overall = top.get("against_all_baselines")
    if overall and overall["seeds"] and any(record["best_baseline"] != record["best_learned_baseline"] for record in per_seed.values()):
        lines.append("- Against the best baseline of all (the fixed hash included): " + ", ".join(
            f"seed {seed}: {_fmt(ratio, '{:.2f}×', 'not reached')}" for seed, ratio in zip(overall["seeds"], overall["ratios"]))
            + f"; ≥ {TARGET_RATIO}× on every seed: **{'met' if overall['meets_ratio_target'] else 'missed'}**.")
    if top.get("sees_future_tokens"):
        lines.append(f"- **`{HEADLINE}` sees future tokens** (its Grouter is bidirectional): its losses are not "
                     "comparable with the causal baselines' and the headline does not count.")
    lines.append(f"- Target ≥ {TARGET_RATIO}× on every seed: **{'met' if top['meets_ratio_target'] else 'missed'}**.")
    lines.append(f"- `{HEADLINE}` ahead of the best learned baseline at every evaluation on every seed: "
                 f"**{'yes' if top['ahead_everywhere_all_seeds'] else 'no'}**.")
    lines.append("- Baselines compared on each seed: " + "; ".join(
        f"seed {seed}: {', '.join(record['baselines'])} (best: {record['best_baseline']}; best learned: "
        f"{record['best_learned_baseline']})" for seed, record in per_seed.items()) + ".")
    if len(top["seeds"]) < 2:
        lines.append("- Only one seed has the headline run: the spread is not measured.")
    lines += ["", "Data efficiency = tokens the best baseline needs to reach its final validation loss ÷ "
              "tokens the Grouter run needs to reach that loss (linear interpolation between evaluations; "
              "'not reached' when it never does). Loss gap = Grouter − best baseline validation loss at the "
              "same token count (negative = Grouter ahead).", ""]

    for title, key, best_key in (("the best learned baseline", "comparisons_learned", "best_learned_baseline"),
                                 ("the best baseline of all", "comparisons", "best_baseline")):
        if key == "comparisons" and all(record["best_baseline"] == record["best_learned_baseline"]
                                        for record in per_seed.values()):
            continue
        lines += [f"## Comparison with {title}, per seed", "",
                  "| seed | baseline (final loss) | Grouter run | final loss | gap at end | "
                  "ahead at every eval | tokens to baseline's final loss | data efficiency |",
                  "|---|---|---|---|---|---|---|---|"]
        for seed, record in per_seed.items():
            best = record[best_key]
            best_loss = rows[f"{best}-s{seed}"]["final_val_loss"]
            for name, comparison in sorted(record[key].items()):
                eff, gap = comparison["efficiency"], comparison["gap"]
                lines.append(f"| {seed} | {best} ({best_loss:.4f}) | {label(name, rows[f'{name}-s{seed}'])} | "
                             f"{rows[f'{name}-s{seed}']['final_val_loss']:.4f} | "
                             f"{_fmt(gap['final'], '{:+.4f}')} | {'yes' if gap['ahead_everywhere'] else 'no'} | "
                             f"{_fmt(eff['candidate_tokens'], '{:,.0f}', 'not reached')} vs {eff['baseline_tokens']:,.0f} | "
                             f"{_fmt(eff['ratio'], '{:.2f}×', 'not reached')} |")
        lines.append("")

    lines += ["## Every run", "",
              "| run | steps | tokens | final val loss | MaxVioGlobal (first tenth → last half) | expert bias: mean abs change per step, final mean abs "
              "| grad-norm CV (50) | grad-norm CV (500) | tokens/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        bias = ("n/a" if row.get("expert_bias_change") is None else
                f"{row['expert_bias_change']:.2e}, {_fmt(row.get('expert_bias_abs'))}")
        lines.append(f"| {label(name, row)} | {row['steps']} | {row['tokens']:,.0f} | {row['final_val_loss']:.4f} | "
                     f"{_fmt(row.get('max_vio_first_tenth'))} → {_fmt(row['max_vio'])} | {bias} | "
                     f"{_fmt(row['grad_norm_cv_50'])} | {_fmt(row['grad_norm_cv_500'])} | "
                     f"{_fmt(row['tokens_per_s'], '{:,.0f}')} |")
    lines += ["", "MaxVioGlobal: (max expert load − mean) / mean over each step's global batch, averaged over "
              "MoE layers, over the first tenth and over the last half of training. Expert bias (aux-loss-free "
              "only): the mean absolute change of the selection bias per step, and its final mean absolute "
              "value: the bias moved. Grad-norm CV: std/mean of the gradient norm in "
              "every sliding window of 50 (500) steps, averaged; n/a when the run is shorter than the window. "
              "tokens/s: median over steps, measured on this machine (shared CPUs inflate wall time).", ""]
    if any(row.get("sees_future_tokens") for row in rows.values()):
        lines += [f"Runs marked *{FUTURE_LABEL.strip()}* were routed by a bidirectional Grouter (the paper's "
                  "encoder, router.grouter.allow_future_context=true): the experts and gate weights of token t "
                  "depended on tokens after t, so their validation losses are not comparable with causal "
                  "routers' and the model cannot generate. Every other Grouter row is causal.", ""]

    lines += tuning_section(summaries, rows)
    if stability:
        lines += ["## Routing stability of learned routers (first seed)", "",
                  "| run | transitions | mean unchanged share | per layer (mean over checkpoints) |", "|---|---|---|---|"]
        for name, record in sorted(stability.items()):
            grid = np.asarray(record["unchanged_LT"], dtype=np.float64)
            per_layer = ", ".join(f"{value:.3f}" for value in grid.mean(axis=1))
            lines.append(f"| {name} | {grid.shape[1]} | {grid.mean():.3f} | {per_layer} |")
        lines += ["", "Share of probe tokens whose exact top-k expert set is unchanged between consecutive "
                  "checkpoints. The Grouter runs' expert choices are fixed: 1.000 by construction.", ""]
    else:
        lines += ["## Routing stability", "", "Not measured: no learned-router run kept checkpoints "
                  "(target.checkpoint_interval=0).", ""]

    lines += ["## Figures", ""]
    titles = {"loss_curves": "Validation loss against tokens", "maxvio_vs_loss": "MaxVioGlobal against final loss (paper Fig. 4b)",
              "grad_norm_cv": "Gradient-norm CV", "routing_stability": "Routing stability (paper Fig. 1a)"}
    for key, path in figures.items():
        lines.append(f"![{titles[key]}]({Path(path).name})")
    lines += ["", "## Pipeline", ""]
    for name, summary in summaries.items():
        shown = {key: value for key, value in summary.items() if not isinstance(value, (dict, list))}
        lines.append(f"- **{name}**: " + ", ".join(f"{key}={_fmt(value, '{:.4g}') if isinstance(value, float) else value}"
                                                  for key, value in shown.items()))
        for key in ("before", "after"):
            if isinstance(summary.get(key), dict):
                lines.append(f"  - {key}: " + ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}"
                                                        for k, v in summary[key].items()))
    ratios = summaries.get("plan", {}).get("ratios_to_default")
    if ratios:
        lines += ["", f"EP placement plan (EP={summaries['plan']['ep_size']}, {summaries['plan']['samples']} samples of "
                  "the routing cache), planned ÷ default layout volumes (lower is better): "
                  + ", ".join(f"{key} {value:.3f}" for key, value in ratios.items() if value is not None)
                  + (". Volumes only: these CPU runs train with EP=1." if "planned_ep" not in summaries else ".")]
    if summaries.get("planned_ep", {}).get("run"):
        from megatron_grouter.reproduce.planned_run import report_line

        tuned = [row for name, row in sorted(rows.items()) if name.startswith("grouter_tuned-s")]
        lines += ["", report_line(summaries["planned_ep"], tuned[0]["final_val_loss"] if tuned else None)]
    if preset.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in preset["notes"]]]
    return "\n".join(lines) + "\n"
