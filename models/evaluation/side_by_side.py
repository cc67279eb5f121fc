"""Exported models judged side by side on named sets of labelled images, each with its own band.

Retraining uses it to put the candidate beside the champion on the old test set and on recently
reviewed parts (sets that are not a dataset split). Each model runs as serving runs it (its ONNX
file, its image recipe, its thresholds), so the figures are what the line would see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kensa.models.data.imageprep import Preprocess
from kensa.models.data.parts import load_image
from kensa.models.evaluation.qc import ANOMALY_CLASS, OK, qc_metrics
from kensa.models.onnx.contract import read_metadata, read_preprocess
from kensa.models.onnx.export import cpu_session, run_onnx

HEADLINE: tuple[str, ...] = (
    "escape_rate",
    "false_reject_rate",
    "automation_rate",
    "review_rate",
    "accuracy",
)


@dataclass(frozen=True)
class EvalSet:
    """A named list of labelled images to judge."""

    name: str
    paths: Sequence[Path]
    labels: Sequence[str]
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.paths)} images but {len(self.labels)} labels")


def _pixels(paths: Sequence[Path], recipe: Preprocess) -> np.ndarray:
    """NHWC uint8, decoded with the model's recipe exactly as serving decodes."""
    if not paths:
        return np.zeros((0, recipe.size, recipe.size, 3), np.uint8)
    return np.stack([load_image(p, recipe).permute(1, 2, 0).numpy() for p in paths])


def score_model(onnx_path: Path, images: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """QC metrics of one exported model on ``images`` (already at its input size)."""
    meta = read_metadata(onnx_path)
    classes = list(meta["classes"])
    if classes == [OK, ANOMALY_CLASS]:  # learned from good parts: every defect type is its defect
        labels = [OK if label == OK else ANOMALY_CLASS for label in labels]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of {onnx_path.name} ({classes})")
    index = np.array([classes.index(label) for label in labels], dtype=int)
    probs = run_onnx(cpu_session(onnx_path), images) if len(images) else np.zeros((0, len(classes)))
    band = meta["thresholds"]
    return qc_metrics(probs, index, classes, float(band["t_ok"]), float(band["t_defect"]))


def judge_side_by_side(models: Mapping[str, Path], sets: Sequence[EvalSet]) -> dict[str, Any]:
    """Headline metrics of each model on each set, and each model's difference from the first.

    Returns ``{set: {"n", "n_defective", "description", "models": {model: {metric: value}},
    "delta": {model: {metric: value - first model's}}}}``.
    """
    names = list(models)
    recipes = {name: read_preprocess(read_metadata(path)) for name, path in models.items()}
    out: dict[str, Any] = {}
    for s in sets:
        decoded = {recipe: _pixels(s.paths, recipe) for recipe in set(recipes.values())}
        scores = {name: score_model(path, decoded[recipes[name]], s.labels) for name, path in models.items()}
        first = scores[names[0]]
        out[s.name] = {
            "n": len(s.paths),
            "n_defective": first["n_defective"],
            "description": s.description,
            "models": {n: {k: scores[n][k] for k in HEADLINE} for n in names},
            "delta": {n: {k: scores[n][k] - first[k] for k in HEADLINE} for n in names[1:]},
        }
    return out


def side_by_side_markdown(comparison: Mapping[str, Any]) -> str:
    """A table per set: metric, each model, the change (markdown, for Prefect and MLflow)."""
    parts = []
    for set_name, entry in comparison.items():
        models = list(entry["models"])
        parts.append(
            f"**{set_name}** ({entry['n']} parts, {entry['n_defective']} defective)"
            + (f": {entry['description']}" if entry["description"] else "")
        )
        if not entry["n"]:
            parts.append("\n_no parts in this set_\n")
            continue
        lines = ["| metric | " + " | ".join(models) + " | change |", "|---" * (len(models) + 2) + "|"]
        for metric in HEADLINE:
            values = " | ".join(f"{entry['models'][m][metric]:.2%}" for m in models)
            change = entry["delta"][models[-1]][metric] if len(models) > 1 else 0.0
            lines.append(f"| {metric} | {values} | {change:+.2%} |")
        parts.append("\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_side_by_side(comparison: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: each headline metric, each model, one panel per (non-empty) set."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no backend chosen

    sets = [(name, e) for name, e in comparison.items() if e["n"]]
    panels = max(len(sets), 1)
    fig = Figure(figsize=(5.5 * panels, 3.8))
    axes = fig.subplots(1, panels, squeeze=False)
    for ax, (name, entry) in zip(axes[0], sets, strict=False):
        models = list(entry["models"])
        x = np.arange(len(HEADLINE))
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            values = [entry["models"][model][m] for m in HEADLINE]
            ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model)
        ax.set_xticks(x, [m.replace("_rate", "").replace("_", " ") for m in HEADLINE], rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of parts")
        ax.set_title(f"{name} ({entry['n']} parts)")
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
