"""Pictures of evaluation results: confusion matrix, score histograms, escape curve, robustness."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """A Figure of its own, never pyplot: files only, no global state, and the caller's
    matplotlib backend stays what they chose (``savefig`` picks Agg for a PNG by itself)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    arr = np.asarray(cm, dtype=float)
    norm = arr / np.clip(arr.sum(1, keepdims=True), 1, None)
    fig, ax = _figure((1.2 * len(classes) + 2, 1.0 * len(classes) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    short = [c.removeprefix("defect_") for c in classes]
    ax.set_xticks(range(len(classes)), short, rotation=40, ha="right")
    ax.set_yticks(range(len(classes)), short)
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(arr[i, j])}", ha="center", va="center", color=colour, fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (test split; counts, colour = row share)")
    return _save(fig, path)


def plot_score_histograms(
    scores: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    t_ok: float,
    t_defect: float,
    path: Path,
) -> Path:
    fig, ax = _figure((7, 4))
    bins = np.linspace(0, 1, 41)
    for i, c in enumerate(classes):
        m = labels == i
        if m.any():
            ax.hist(scores[m], bins=bins.tolist(), alpha=0.55, label=f"{c} (n={int(m.sum())})", log=True)
    ax.axvspan(t_ok, t_defect, color="orange", alpha=0.15, label="review band")
    ax.axvline(t_ok, color="green", ls="--", lw=1)
    ax.axvline(t_defect, color="red", ls="--", lw=1)
    ax.set_xlabel("defect score = 1 − p(ok)")
    ax.set_ylabel("parts (log)")
    ax.set_title("Defect score by true class")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_escape_curve(curve: dict[str, list[float]], chosen: dict[str, float], path: Path) -> Path:
    fig, ax = _figure((6, 4))
    ax.plot(curve["automation_rate"], curve["escape_rate"], marker=".", lw=1)
    ax.scatter(
        [chosen["automation_rate"]],
        [chosen["escape_rate"]],
        color="red",
        zorder=3,
        label="calibrated band (test)",
    )
    ax.set_xlabel("share of parts passed automatically")
    ax.set_ylabel("escape rate (defective parts passed)")
    ax.set_title("Escape vs automation")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_robustness_heatmap(robustness: dict[str, Any], metric: str, path: Path) -> Path:
    per = robustness["per_corruption"]
    names = list(per)
    severities = sorted({int(s) for n in names for s in per[n]})
    grid = np.array([[per[n][str(s)][metric] for s in severities] for n in names])
    fig, ax = _figure((1.1 * len(severities) + 3, 0.45 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="Reds", aspect="auto", vmin=0, vmax=max(0.05, float(grid.max())))
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    for i in range(len(names)):
        for j in range(len(severities)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    clean = robustness["clean"][metric]
    ax.set_title(f"{metric.replace('_', ' ')} under shop-floor corruptions (clean {clean:.3f})")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path)
