"""The pre-registered comparison: each seed's best baseline, the headline and its statistics.

A preset names its headline before it runs (`headline:` in conf/reproduce): the router whose row is
the method, the baselines whose best (per seed, by final validation loss) is the rival — every
baseline of the run, the fixed hash included, unless the preset lists them — and the bar: data
efficiency the router must reach on every seed. The verdict says "met" or "missed" as measured.
The best *learned* baseline (hash left out) is kept as a secondary comparison, never the headline.

Statistics over seeds: mean ± sample std of the per-seed data efficiency, and the paired
comparison per seed — the router's final loss minus the rival's on the same seed (same data order
and initialisation) — with the mean difference, its std and the paired t statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_grouter.errors import UserError
from megatron_grouter.reproduce import metrics as m
from megatron_grouter.reproduce.routers import is_baseline, is_grouter, is_learned


@dataclass(frozen=True)
class HeadlineSpec:
    router: str = "grouter_tuned"
    baselines: tuple[str, ...] | None = None  # None: every baseline of the run
    bar: float = 1.3
    selection: str = ""

    @classmethod
    def from_preset(cls, preset: dict) -> "HeadlineSpec":
        spec = dict(preset.get("headline") or {})
        baselines = spec.get("baselines")
        if baselines is not None:
            if isinstance(baselines, str) or not all(is_baseline(name) for name in baselines):
                raise UserError(f"headline.baselines={baselines!r} must be a list of baseline routers (no Grouter "
                                "runs), e.g. [aux_loss, hash]; or null for every baseline of the run")
            baselines = tuple(str(name) for name in baselines)
        return cls(router=str(spec.get("router", cls.router)), baselines=baselines,
                   bar=float(spec.get("bar", cls.bar)), selection=str(spec.get("selection") or ""))


def compare_seed(runs: dict[str, m.RunMetrics], baselines: tuple[str, ...] | None = None) -> dict:
    """One seed: the best of the headline baselines (`baselines`, or every baseline run; the fixed
    hash included) and the best learned baseline, and every Grouter run's data efficiency and loss
    gap against each (`comparisons`, `comparisons_learned`)."""
    every = {name: run for name, run in runs.items() if is_baseline(name)}
    pool = every if baselines is None else {name: run for name, run in every.items() if name in baselines}
    if not pool:
        raise UserError(f"none of the headline baselines {list(baselines or [])} was trained on this seed; "
                        "add them to target.routers")
    best = m.best_run(pool)
    learned = {name: run for name, run in every.items() if is_learned(name)}
    best_learned = m.best_run(learned) if learned else best

    def against(reference: str) -> dict:
        return {name: {"efficiency": m.data_efficiency(every[reference], run),
                       "gap": m.loss_gap(every[reference], run)}
                for name, run in runs.items() if is_grouter(name)}
    comparisons = against(best)
    return {"best_baseline": best, "best_learned_baseline": best_learned, "baselines": sorted(pool),
            "missing_baselines": sorted(set(baselines or ()) - set(pool)),
            "comparisons": comparisons,
            "comparisons_learned": comparisons if best_learned == best else against(best_learned)}


def paired(differences: list[float]) -> dict:
    """Mean, sample std and paired t statistic of per-seed differences (None where undefined)."""
    values = np.asarray(differences, dtype=np.float64)
    mean = float(values.mean()) if len(values) else None
    std = float(values.std(ddof=1)) if len(values) > 1 else None
    t = (mean / (std / math.sqrt(len(values)))) if std else None
    return {"differences": values.tolist(), "mean": mean, "std": std, "t": t,
            "negative": int((values < 0).sum()), "seeds": len(values)}


def spread(values: list[float | None]) -> dict:
    reached = [value for value in values if value is not None]
    return {"mean": float(np.mean(reached)) if reached else None,
            "std": float(np.std(reached, ddof=1)) if len(reached) > 1 else None,
            "min": min(reached) if reached else None, "max": max(reached) if reached else None,
            "all_reached": bool(values) and len(reached) == len(values)}


def headline(per_seed: dict[int, dict], finals: dict[tuple[str, int], float], spec: HeadlineSpec,
             against: str = "comparisons", expected_seeds: list[int] | None = None) -> dict:
    """The verdict of `spec.router` against each seed's best (headline) baseline, or with
    against="comparisons_learned" the best learned one: per-seed efficiency, its spread, the paired
    final-loss differences, and the verdict on the bar: "missed" as soon as one complete seed misses
    it, "met" when every expected seed is complete (all headline baselines trained) and meets it,
    else "not measured yet" (seeds or baselines still missing)."""
    reference = "best_baseline" if against == "comparisons" else "best_learned_baseline"
    seeds, ratios, ahead, rivals, differences = [], [], [], [], []
    for seed, record in per_seed.items():
        comparison = record[against].get(spec.router)
        if comparison is None:
            continue
        rival = record[reference]
        seeds.append(seed)
        rivals.append(rival)
        ratios.append(comparison["efficiency"]["ratio"])
        ahead.append(comparison["gap"]["ahead_everywhere"])
        differences.append(finals[(spec.router, seed)] - finals[(rival, seed)])
    stats = spread(ratios)
    complete = [seed for seed in seeds if not per_seed[seed].get("missing_baselines")]
    incomplete = sorted(set(expected_seeds or seeds) - set(complete))
    missed = any(ratio is None or ratio < spec.bar for seed, ratio in zip(seeds, ratios) if seed in complete)
    verdict = "missed" if missed else "not measured yet" if incomplete or not seeds else "met"
    return {"router": spec.router, "bar": spec.bar, "seeds": seeds, "rivals": rivals, "ratios": ratios,
            **stats, "paired_final_loss": paired(differences),
            "ahead_everywhere_all_seeds": bool(ahead) and all(ahead),
            "complete_seeds": complete, "incomplete_seeds": incomplete, "verdict": verdict}


def controls(per_seed: dict[int, dict], finals: dict[tuple[str, int], float], spec: HeadlineSpec,
             names: tuple[str, ...]) -> dict:
    """Each control's efficiency against the headline rival and its paired final-loss difference
    with the headline router (control − router; positive: the router is better)."""
    out = {}
    for name in names:
        seeds = [seed for seed, record in per_seed.items()
                 if name in record["comparisons"] and (spec.router, seed) in finals]
        if not seeds:
            continue
        out[name] = {"seeds": seeds,
                     "ratios": [per_seed[seed]["comparisons"][name]["efficiency"]["ratio"] for seed in seeds],
                     "final_loss": [finals[(name, seed)] for seed in seeds],
                     "minus_router": paired([finals[(name, seed)] - finals[(spec.router, seed)] for seed in seeds])}
        out[name].update(spread(out[name]["ratios"]))
    return out
