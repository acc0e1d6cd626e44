"""The experiment's measures, computed from mg-train's metrics.jsonl files.

  val_curve            validation loss against tokens seen
  tokens_to_reach      tokens a curve needs to first reach a loss (linear interpolation between
                       evaluations; None = not reached)
  tokens_to_stay_below the crossing rule of the report, robust to noise: the curve is smoothed
                       (each interior evaluation averaged with its two neighbours; the first and
                       last kept), and the crossing is the first point after which the smoothed
                       curve stays at or below the loss at every later evaluation (linear
                       interpolation into the last up-crossing); None when it ends above
  data_efficiency      tokens the baseline needs to reach its final loss ÷ tokens the candidate
                       needs to reach that same loss (None when the candidate never does)
  loss_gap             candidate − baseline validation loss at the evaluations both runs made
  max_vio              MaxVioGlobal (mean over MoE layers) averaged over the last half of training
                       (or over its first fraction: how imbalanced a run started)
  grad_norm_cv         coefficient of variation (std / mean) of the gradient norm in sliding
                       windows of w steps, averaged over windows (None when the run is shorter)
  throughput           median tokens/s of the training steps
  sees_future_tokens   whether the run's routing read tokens after the one routed (a bidirectional
                       Grouter, opted in: its step records carry routing/sees_future_tokens)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_grouter.errors import UserError


@dataclass
class RunMetrics:
    """The per-step and per-evaluation records of one training run."""

    name: str
    steps: list[dict]  # records with "loss" (one per training step)
    evals: list[dict]  # records with "val_loss"

    @property
    def tokens(self) -> np.ndarray:
        return np.asarray([record["tokens"] for record in self.evals], dtype=np.float64)

    @property
    def val_loss(self) -> np.ndarray:
        return np.asarray([record["val_loss"] for record in self.evals], dtype=np.float64)

    def series(self, key: str) -> np.ndarray:
        return np.asarray([record[key] for record in self.steps if key in record], dtype=np.float64)


def read_run(out_dir: str | Path, name: str | None = None) -> RunMetrics:
    """Parse `<out_dir>/metrics.jsonl`; a resumed run's repeated steps keep their last record."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; run mg-train with train.out_dir={out_dir} first")
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves at most a partial last line.
            continue
        target = evals if "val_loss" in record else steps if "loss" in record else None
        if target is not None:
            target[int(record["step"])] = record
    return RunMetrics(name or Path(out_dir).name, [steps[key] for key in sorted(steps)],
                      [evals[key] for key in sorted(evals)])


def tokens_to_reach(tokens: np.ndarray, losses: np.ndarray, target: float) -> float | None:
    """Tokens at which the curve first reaches `target`, interpolated linearly; None if never."""
    for index, loss in enumerate(losses):
        if loss <= target:
            if index == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[index - 1], tokens[index], losses[index - 1], loss
            return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))
    return None


def smoothed(losses: np.ndarray) -> np.ndarray:
    """Each interior point averaged with its two neighbours; the endpoints kept as measured."""
    losses = np.asarray(losses, dtype=np.float64)
    if len(losses) < 3:
        return losses.copy()
    out = losses.copy()
    out[1:-1] = (losses[:-2] + losses[1:-1] + losses[2:]) / 3
    return out


def tokens_to_stay_below(tokens: np.ndarray, losses: np.ndarray, target: float) -> float | None:
    """Tokens after which the smoothed curve stays <= `target` at every later evaluation (linear
    interpolation into the last up-crossing); None when its last point is above `target`."""
    curve = smoothed(losses)
    if not len(curve) or curve[-1] > target:
        return None
    above = np.flatnonzero(curve > target)
    if not len(above):
        return float(tokens[0])
    index = int(above[-1]) + 1  # first point of the final stretch at or below target
    t0, t1, l0, l1 = tokens[index - 1], tokens[index], curve[index - 1], curve[index]
    return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))


def data_efficiency(baseline: RunMetrics, candidate: RunMetrics) -> dict:
    """Baseline tokens to its final loss ÷ candidate tokens to the same loss, both by the crossing
    rule (tokens_to_stay_below)."""
    target = float(baseline.val_loss[-1])
    base_tokens = tokens_to_stay_below(baseline.tokens, baseline.val_loss, target)
    cand_tokens = tokens_to_stay_below(candidate.tokens, candidate.val_loss, target)
    ratio = None if cand_tokens is None or cand_tokens <= 0 or not base_tokens else base_tokens / cand_tokens
    return {"target_loss": target, "baseline_tokens": base_tokens, "candidate_tokens": cand_tokens,
            "ratio": ratio}


def loss_gap(baseline: RunMetrics, candidate: RunMetrics) -> dict:
    """Candidate − baseline validation loss at each token count both evaluated at."""
    base = dict(zip(baseline.tokens.tolist(), baseline.val_loss.tolist()))
    pairs = [(tokens, loss - base[tokens]) for tokens, loss
             in zip(candidate.tokens.tolist(), candidate.val_loss.tolist()) if tokens in base and tokens > 0]
    gaps = [gap for _, gap in pairs]
    return {"tokens": [tokens for tokens, _ in pairs], "gap": gaps,
            "final": gaps[-1] if gaps else None,
            "ahead_everywhere": bool(gaps) and all(gap < 0 for gap in gaps)}


def max_vio(run: RunMetrics, first_fraction: float | None = None) -> float | None:
    """Mean MaxVioGlobal over the last half of the training steps (or over their first
    `first_fraction`)."""
    if first_fraction is None:
        return last_half_mean(run, "moe/max_vio")
    values = run.series("moe/max_vio")
    return float(values[:max(1, int(len(values) * first_fraction))].mean()) if len(values) else None


def last_half_mean(run: RunMetrics, key: str) -> float | None:
    """Mean of a per-step metric over the last half of the steps that logged it; None if none did."""
    values = run.series(key)
    return float(values[len(values) // 2:].mean()) if len(values) else None


def mean_series(run: RunMetrics, key: str) -> float | None:
    """Mean of a per-step metric; None when the run never logged it."""
    values = run.series(key)
    return float(values.mean()) if len(values) else None


def last_value(run: RunMetrics, key: str) -> float | None:
    values = run.series(key)
    return float(values[-1]) if len(values) else None


def grad_norm_cv(run: RunMetrics, window: int) -> float | None:
    """Mean over sliding windows of `window` steps of std/mean of the gradient norm; None if too short."""
    norms = run.series("grad_norm")
    if window < 2 or len(norms) < window:
        return None
    views = np.lib.stride_tricks.sliding_window_view(norms, window)
    means = views.mean(axis=1)
    return float((views.std(axis=1) / np.where(means > 0, means, np.nan)).mean())


def sees_future_tokens(run: RunMetrics) -> bool:
    return any(record.get("routing/sees_future_tokens") for record in run.steps)


def throughput(run: RunMetrics) -> float | None:
    values = run.series("tokens_per_s")
    return float(np.median(values)) if len(values) else None


def best_run(runs: dict[str, RunMetrics]) -> str:
    """The run with the lowest final validation loss."""
    if not runs:
        raise UserError("no baseline runs to compare against; keep at least one baseline router in target.routers")
    return min(runs, key=lambda name: float(runs[name].val_loss[-1]))
