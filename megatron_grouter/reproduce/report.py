"""report.md (+ summary.json and PNG figures) from the target runs' metrics files.

The headline is pre-registered by the preset (`headline:` — router, baselines, bar; see
reproduce/verdict.py): per seed the best of the headline baselines (every baseline of the run, the
fixed hash included, unless the preset lists them) is the rival; the report leads with the router's
data efficiency against it on every seed, mean ± std, the paired final-loss differences, and "met"
or "missed" for the bar. The best *learned* baseline is a secondary table. Controls (grouter_random:
frozen without transfer; grouter_warm: transfer without freezing) get their own rows, and the
token budget of the whole pipeline stands beside the target-only figure (reproduce/budget.py).

Every row of a run whose routing saw future tokens (a bidirectional Grouter trained with
router.grouter.allow_future_context=true, e.g. grouter_tuned_bidirectional) says so in its name:
its validation loss is not comparable with causal routers'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_grouter.atomic_files import write_text_atomic
from megatron_grouter.reproduce import budget
from megatron_grouter.reproduce import ep_cluster_stage
from megatron_grouter.reproduce import metrics as m
from megatron_grouter.reproduce import plots
from megatron_grouter.reproduce.routers import BIDIRECTIONAL, CONTROLS, RANDOM, TUNED_VARIANT_PREFIX
from megatron_grouter.reproduce.stages import write_json_atomic
from megatron_grouter.reproduce.verdict import HeadlineSpec, compare_seed, controls, headline

CV_WINDOWS = (50, 500)
FUTURE_LABEL = " (sees future tokens)"
CROSSING_RULE = ("Data efficiency = tokens the rival baseline needs to reach its final validation loss ÷ tokens "
                 "the Grouter run needs to reach that loss. Crossing rule (robust to noise): each curve is "
                 "smoothed (every interior evaluation averaged with its two neighbours, the first and last kept "
                 "as measured) and a run reaches the loss at the first point after which its smoothed curve stays "
                 "at or below it at every later evaluation (linear interpolation into that last crossing); 'not "
                 "reached' when its curve ends above. Loss gap = Grouter − baseline validation loss at the same "
                 "token count (negative = Grouter ahead).")


def _fmt(value, pattern: str = "{:.3f}", missing: str = "n/a") -> str:
    return missing if value is None else pattern.format(value)


def _pm(mean, std, pattern: str = "{:.2f}") -> str:
    if mean is None:
        return "n/a"
    return pattern.format(mean) + ("" if std is None else " ± " + pattern.replace("+", "").format(std))


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


def write_report(out_dir: Path, runs: dict[tuple[str, int], Path], summaries: dict,
                 stability_file: Path | None, preset: dict) -> Path:
    """Read every run's metrics, draw the figures, write report.md and summary.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = {key: m.read_run(path, key[0]) for key, path in runs.items()}
    loaded = {key: run for key, run in loaded.items() if len(run.evals)}
    spec = HeadlineSpec.from_preset(preset)
    seeds = sorted({seed for _, seed in loaded})
    per_seed = {seed: compare_seed({router: run for (router, s), run in loaded.items() if s == seed}, spec.baselines)
                for seed in seeds}
    rows = {f"{router}-s{seed}": run_row(run) for (router, seed), run in sorted(loaded.items())}
    finals = {key: float(run.val_loss[-1]) for key, run in loaded.items()}
    expected = [int(seed) for seed in preset.get("seeds") or seeds]
    top = headline(per_seed, finals, spec, expected_seeds=expected)
    top["learned_only"] = headline(per_seed, finals, spec, "comparisons_learned", expected_seeds=expected)
    top["controls"] = controls(per_seed, finals, spec, CONTROLS)
    top["sees_future_tokens"] = any(rows.get(f"{spec.router}-s{seed}", {}).get("sees_future_tokens")
                                    for seed in top["seeds"])
    top["budget"] = token_budget(summaries, rows, per_seed, top, spec)
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
    text = render(preset, spec, top, per_seed, rows, summaries, stability, figures)
    write_text_atomic(out_dir / "report.md", text)
    return out_dir / "report.md"


def tuned_router(stage: str) -> str:
    """The target router trained with the Grouter of a tune stage (tune, tune-<variant>, ...)."""
    if stage == "tune":
        return "grouter_tuned"
    if stage == "tune-bidirectional":
        return BIDIRECTIONAL
    if stage == "tune-random":
        return RANDOM
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
              "that the distilled (untuned) Grouter also picks. mg-tune's default objective was chosen by "
              "the target runs' validation loss on the selection split (see the headline's selection note).", ""]
    return lines


def token_budget(summaries: dict, rows: dict, per_seed: dict, top: dict, spec: HeadlineSpec) -> dict:
    """Tokens of the Grouter chain (source, distillation, tuning) and, per seed, of the headline
    router's target run to the rival's final loss, against the rival's target-only tokens; read with
    the source paid by someone else (overhead: distillation + tuning) and with a source we train."""
    chain = budget.pipeline_budget(summaries)
    per = []
    for seed in top["seeds"]:
        efficiency = per_seed[seed]["comparisons"][spec.router]["efficiency"]
        rival_tokens, router_tokens = efficiency["baseline_tokens"], efficiency["candidate_tokens"]
        overhead = (chain["distill"] or 0) + (chain["tune"] or 0)
        paid = None if router_tokens is None else router_tokens + overhead
        own = None if paid is None or chain["source"] is None else paid + chain["source"]
        per.append({"seed": seed, "rival": per_seed[seed]["best_baseline"], "rival_tokens": rival_tokens,
                    "router_tokens": router_tokens, "target_run_tokens": rows[f"{spec.router}-s{seed}"]["tokens"],
                    "with_bought_source": paid, "with_own_source": own,
                    "efficiency_bought_source": None if not paid else rival_tokens / paid,
                    "efficiency_own_source": None if not own else rival_tokens / own})
    return {"chain": chain, "random_chain": budget.pipeline_budget(summaries, "-random"), "per_seed": per}


def headline_lines(spec: HeadlineSpec, top: dict, per_seed: dict) -> list[str]:
    def ratios(record: dict) -> str:
        return ", ".join(f"seed {seed}: {_fmt(ratio, '{:.2f}×', 'not reached')} (vs {rival})"
                         for seed, ratio, rival in zip(record["seeds"], record["ratios"], record["rivals"]))

    pool = ", ".join(spec.baselines) if spec.baselines else "every baseline of the run"
    lines = ["## Headline (pre-registered)", "",
             f"Registered in the preset before the run: router `{spec.router}`; rival per seed = the best (lowest "
             f"final validation loss) of {pool} — the fixed hash included; bar: ≥ {spec.bar}× data efficiency on "
             f"every seed. The learned-only comparison is secondary." + (f" Selection: {spec.selection}"
                                                                          if spec.selection else ""), ""]
    if not top["seeds"]:
        return lines + [f"- `{spec.router}` has no run: no headline.", ""]
    pair = top["paired_final_loss"]
    lines += [f"- **`{spec.router}` against the best baseline of all: {ratios(top)}; mean "
              f"{_pm(top['mean'], top['std'])}× over {len(top['seeds'])} seed(s). Bar ≥ {spec.bar}× on every seed: "
              f"{top['verdict']}"
              + (f" (seeds not complete: {', '.join(map(str, top['incomplete_seeds']))})" if top["incomplete_seeds"] else "")
              + ".**",
              f"- Paired per seed (same data order and initialisation), final validation loss `{spec.router}` − rival: "
              + ", ".join(f"{value:+.4f}" for value in pair["differences"])
              + f"; mean {_pm(pair['mean'], pair['std'], '{:+.4f}')}"
              + (f", paired t = {pair['t']:.2f} (df {pair['seeds'] - 1})" if pair["t"] is not None else "")
              + f"; lower on {pair['negative']} of {pair['seeds']} seeds.",
              f"- Ahead of the rival at every evaluation on every seed: "
              f"{'yes' if top['ahead_everywhere_all_seeds'] else 'no'}."]
    learned = top.get("learned_only")
    if learned and learned["seeds"]:
        lines.append(f"- Secondary, against the best *learned* baseline (hash left out): {ratios(learned)}; mean "
                     f"{_pm(learned['mean'], learned['std'])}×; ≥ {spec.bar}× on every seed: {learned['verdict']}.")
    for name, control in (top.get("controls") or {}).items():
        diff = control["minus_router"]
        shown = (f"{_pm(control['mean'], control['std'])}× " if control["mean"] is not None else "")
        lines.append(f"- Control `{name}`: against the same rival {shown}"
                     f"({', '.join(_fmt(ratio, '{:.2f}×', 'not reached') for ratio in control['ratios'])}); final loss "
                     f"minus `{spec.router}`'s {_pm(diff['mean'], diff['std'], '{:+.4f}')}"
                     + (f" (paired t = {diff['t']:.2f})" if diff["t"] is not None else "") + ".")
    if top.get("sees_future_tokens"):
        lines.append(f"- **`{spec.router}` sees future tokens** (its Grouter is bidirectional): its losses are not "
                     "comparable with the causal baselines' and the headline does not count.")
    if len(top["seeds"]) < 3:
        lines.append(f"- Only {len(top['seeds'])} seed(s) have the headline run: fewer than the three the "
                     "headline needs for its spread.")
    lines.append("- Baselines on each seed: " + "; ".join(
        f"seed {seed}: {', '.join(record['baselines'])} (best: {record['best_baseline']}; best learned: "
        f"{record['best_learned_baseline']}"
        + (f"; not trained yet: {', '.join(record['missing_baselines'])}" if record.get("missing_baselines") else "")
        + ")" for seed, record in per_seed.items()) + ".")
    return lines + ["", CROSSING_RULE, ""]


def budget_lines(spec: HeadlineSpec, top: dict) -> list[str]:
    plan = top.get("budget") or {}
    chain, per = plan.get("chain") or {}, plan.get("per_seed") or []
    if not per:
        return []
    random_chain = plan.get("random_chain") or {}
    lines = ["## Token budget of the whole pipeline", "",
             f"Tokens processed before the target run: source training {_fmt(chain.get('source'), '{:,.0f}')}, "
             f"distillation {_fmt(chain.get('distill'), '{:,.0f}')}, tuning {_fmt(chain.get('tune'), '{:,.0f}')}"
             + (f" (grouter_random: no distillation, tuning {_fmt(random_chain.get('tune'), '{:,.0f}')})"
                if random_chain.get("tune") is not None else "") + ".", "",
             f"| seed | rival | rival's target tokens to its final loss | `{spec.router}` target tokens to it | "
             "+ distillation + tuning (a source someone else paid for) | + source training too (a source we train) |",
             "|---|---|---|---|---|---|"]
    for row in per:
        lines.append(f"| {row['seed']} | {row['rival']} | {_fmt(row['rival_tokens'], '{:,.0f}')} | "
                     f"{_fmt(row['router_tokens'], '{:,.0f}', 'not reached')} | "
                     f"{_fmt(row['with_bought_source'], '{:,.0f}')} ({_fmt(row['efficiency_bought_source'], '{:.2f}×')}) | "
                     f"{_fmt(row['with_own_source'], '{:,.0f}')} ({_fmt(row['efficiency_own_source'], '{:.2f}×')}) |")
    bought = [row["efficiency_bought_source"] for row in per if row["efficiency_bought_source"]]
    own = [row["efficiency_own_source"] for row in per if row["efficiency_own_source"]]
    lines += ["", "Reading. A source someone else paid for (a released MoE, as in the paper): the method's overhead "
              "is distillation and tuning, and the data efficiency counting it is "
              + (f"{np.mean(bought):.2f}× (mean over seeds)" if bought else "n/a")
              + ". A source we train ourselves: the source's tokens count too, and the figure is "
              + (f"{np.mean(own):.2f}× (mean over seeds)" if own else "n/a")
              + (" — below 1×: for one target run of this size the source costs more tokens than the Grouter "
                 "saves; it pays only when one source serves several target runs (the saving recurs per run, the "
                 "source is paid once). " if own and np.mean(own) < 1 else ". ")
              + "Tokens are not equal in cost (a source token is a forward and backward of the source MoE, a "
              "distillation token a source forward plus the small student's step, a tuning token a Grouter "
              "forward): these are tokens processed, not FLOPs.", ""]
    return lines


def comparison_table(title: str, key: str, best_key: str, per_seed: dict, rows: dict) -> list[str]:
    lines = [f"## {title}, per seed", "",
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
                         f"{_fmt(eff['candidate_tokens'], '{:,.0f}', 'not reached')} vs "
                         f"{_fmt(eff['baseline_tokens'], '{:,.0f}')} | {_fmt(eff['ratio'], '{:.2f}×', 'not reached')} |")
    return lines + [""]


def render(preset: dict, spec: HeadlineSpec, top: dict, per_seed: dict, rows: dict, summaries: dict,
           stability: dict, figures: dict) -> str:
    lines = [f"# Grouter reproduction — preset `{preset.get('name')}`", ""]
    lines += [f"Written by `mg-reproduce experiment={preset.get('name')}`. {preset.get('note', '')}".strip(), ""]
    if preset.get("corpus"):
        lines += [f"Corpus: {preset['corpus']}.", ""]
    if preset.get("missing_runs"):
        missing = preset["missing_runs"]
        lines += [f"**Partial report** (written from the finished stages, `report_only=true`): {len(missing)} of the "
                  f"preset's target runs have not run yet: {', '.join(missing)}. Finish them with "
                  f"`mg-reproduce experiment={preset.get('name')}` (finished stages are skipped).", ""]
    if preset.get("minutes") is not None:
        lines += [f"This invocation took {preset['minutes']:.1f} minutes of wall time (stages it found finished were "
                  "skipped; per-stage seconds are listed under Pipeline).", ""]
    lines += headline_lines(spec, top, per_seed)
    lines += comparison_table("Headline comparison: the best baseline of all", "comparisons", "best_baseline",
                              per_seed, rows)
    lines += comparison_table("Secondary comparison: the best learned baseline (hash left out)",
                              "comparisons_learned", "best_learned_baseline", per_seed, rows)
    lines += budget_lines(spec, top)

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
    lines += ep_cluster_stage.report_lines(summaries)  # the optional emulated-cluster stage
    if preset.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in preset["notes"]]]
    return "\n".join(lines) + "\n"
