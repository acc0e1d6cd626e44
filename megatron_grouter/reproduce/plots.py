"""The report's figures (matplotlib, Agg backend, PNG): one function per figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from megatron_grouter.atomic_files import atomic_path
from megatron_grouter.reproduce.metrics import RunMetrics

LINESTYLES = ("-", "--", ":", "-.")


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=110)
    finally:
        plt.close(figure)
    return path


def loss_curves(runs: dict[tuple[str, int], RunMetrics], path: Path) -> Path:
    """Validation loss against tokens; one colour per router, one line style per seed."""
    routers = sorted({router for router, _ in runs})
    seeds = sorted({seed for _, seed in runs})
    colours = plt.get_cmap("tab10")
    figure, axis = plt.subplots(figsize=(8, 5))
    for (router, seed), run in sorted(runs.items()):
        tokens, losses = run.tokens, run.val_loss
        keep = tokens > 0  # the step-0 loss (≈ log V) flattens the interesting part
        axis.plot(tokens[keep] / 1e6, losses[keep], LINESTYLES[seeds.index(seed) % len(LINESTYLES)],
                  color=colours(routers.index(router) % 10), marker="o", markersize=3,
                  label=f"{router}" + (f" (seed {seed})" if len(seeds) > 1 else ""))
    axis.set_xlabel("training tokens (M)")
    axis.set_ylabel("validation loss")
    axis.set_title("Validation loss of the target model")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def maxvio_vs_loss(points: list[tuple[str, float, float]], path: Path) -> Path:
    """MaxVioGlobal against final validation loss per run (the paper's Fig. 4b)."""
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for name, vio, loss in points:
        axis.scatter(vio, loss, s=30)
        axis.annotate(name, (vio, loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("MaxVioGlobal (mean over MoE layers, last half of training)")
    axis.set_ylabel("final validation loss")
    axis.set_title("Load balance against quality")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def grad_norm_cv(rows: list[tuple[str, float | None, float | None]], path: Path,
                 windows: tuple[int, int]) -> Path:
    """Coefficient of variation of the gradient norm per run, for two window lengths."""
    figure, axis = plt.subplots(figsize=(8, 4.5))
    names = [name for name, _, _ in rows]
    positions = np.arange(len(rows))
    for offset, (column, window) in enumerate(zip((1, 2), windows)):
        values = [row[column] if row[column] is not None else np.nan for row in rows]
        axis.bar(positions + (offset - 0.5) * 0.4, values, width=0.4,
                 label=f"window {window} steps" + ("" if not np.all(np.isnan(values)) else " (n/a: run shorter)"))
    axis.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("CV of gradient norm (std / mean)")
    axis.set_title("Gradient-norm stability")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    return _save(figure, path)


def routing_stability(stability: dict[str, dict], path: Path) -> Path:
    """Heatmaps: share of probe tokens whose top-k set is unchanged, per layer and checkpoint."""
    names = sorted(stability)
    figure, axes = plt.subplots(len(names), 1, figsize=(8, 1.5 + 1.4 * len(names)), squeeze=False,
                                layout="constrained")
    image = None
    for axis, name in zip(axes[:, 0], names):
        record = stability[name]
        grid = np.asarray(record["unchanged_LT"], dtype=np.float64)
        image = axis.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis",
                            interpolation="nearest")
        steps = record["steps"]
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).astype(int)
        axis.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
        axis.set_yticks(range(grid.shape[0]), [f"L{i}" for i in range(grid.shape[0])], fontsize=7)
        axis.set_title(name, fontsize=9)
    axes[-1, 0].set_xlabel("checkpoint step (compared with the previous checkpoint)")
    if image is not None:
        figure.colorbar(image, ax=axes[:, 0].tolist(), label="unchanged top-k share", shrink=0.8)
    figure.suptitle("Routing stability of learned routers", fontsize=10)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=110)
    finally:
        plt.close(figure)
    return path
