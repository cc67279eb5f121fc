"""Sweep pictures: scaling curves (error vs parameters and vs data) and the cost frontier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from kensa.flows.choose import Trial
from kensa.models.evaluation.scaling import PowerLaw


def _curve(ax: Any, fit: dict[str, Any], xs: list[float], colour: str, label: str) -> None:
    if not xs:
        return
    law = PowerLaw(**fit)
    grid = np.geomspace(min(xs), max(xs), 50)
    style = "-" if law.fitted else ":"
    ax.plot(
        grid,
        law(grid),
        style,
        color=colour,
        lw=1,
        label=f"{label}: {law.a:.3g}·x^-{law.b:.2f} + {law.c:.3f}"
        + ("" if law.fitted else " (too few points)"),
    )


def plot_scaling(trials: list[Trial], fits: dict[str, Any], path: Path) -> Path:
    # A Figure of its own, never pyplot: no global state, no backend chosen for the caller.
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    top = max(t.fraction for t in trials)
    sized = [t for t in trials if t.fraction == top]
    xs = [float(t.parameters) for t in sized]
    ax1.scatter(xs, [t.clean_error for t in sized], color="C0", label="clean")
    ax1.scatter(xs, [t.corrupted_error for t in sized], color="C3", marker="s", label="corrupted")
    for t in sized:
        ax1.annotate(
            t.model,
            (t.parameters, t.clean_error),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    _curve(ax1, fits["error_vs_parameters"]["clean"], xs, "C0", "clean")
    _curve(ax1, fits["error_vs_parameters"]["corrupted"], xs, "C3", "corrupted")
    ax1.set_xscale("log")
    ax1.set_xlabel("parameters")
    ax1.set_ylabel("classification error (test)")
    ax1.set_title(f"Error vs model size ({top:.0%} of the data)")
    ax1.legend(fontsize=7)
    for i, (model, fit) in enumerate(fits["error_vs_data"].items()):
        pts = sorted((t for t in trials if t.model == model), key=lambda t: t.train_images)
        dx = [float(t.train_images) for t in pts]
        ax2.plot(dx, [t.clean_error for t in pts], "o", color=f"C{i}")
        ax2.plot(dx, [t.corrupted_error for t in pts], "s", color=f"C{i}", alpha=0.6)
        _curve(ax2, fit["clean"], dx, f"C{i}", f"{model} clean")
        _curve(ax2, fit["corrupted"], dx, f"C{i}", f"{model} corrupted")
    ax2.set_xscale("log")
    ax2.set_xlabel("training images")
    ax2.set_ylabel("classification error (test)")
    ax2.set_title("Error vs data (circles clean, squares corrupted)")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_cost_frontier(trials: list[Trial], chosen: Trial | None, path: Path) -> Path:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for t in trials:
        colour = "green" if t.meets_kpi else "grey"
        ax.scatter(t.tco, t.corrupted_escape_rate, color=colour, s=40 + t.parameters / 3e5)
        ax.annotate(
            t.key,
            (t.tco, t.corrupted_escape_rate),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    if chosen is not None:
        ax.scatter(
            [chosen.tco],
            [chosen.corrupted_escape_rate],
            facecolors="none",
            edgecolors="red",
            s=260,
            lw=2,
            label=f"chosen: {chosen.key}",
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("TCO: training + serving over the planned life")
    ax.set_ylabel("escape rate on corrupted parts")
    ax.set_title("Cost frontier (green: meets the KPI; size ∝ parameters)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
