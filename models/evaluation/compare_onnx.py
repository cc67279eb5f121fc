"""Two kensa ONNX models side by side on the same test parts and the same corrupted copies.

Each model is judged with its own governed review band (from its metadata), on one dataset
version, so the numbers differ only because the models do. Relative corruption error is the
ImageNet-C ratio with the first model as the reference (it scores 1.00 by definition).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from kensa.models.data.ingest import DatasetVersion
from kensa.models.evaluation.evaluate_run import SEVERITIES, robustness_report
from kensa.models.evaluation.qc import model_labels, qc_metrics
from kensa.models.evaluation.thresholds import BandResult
from kensa.models.onnx.contract import read_metadata, read_preprocess
from kensa.models.onnx.export import cpu_session, run_onnx
from kensa.models.train.trainer import split_tensors


@dataclass(frozen=True)
class ComparedModel:
    """One side of the comparison: a label people recognise (``v3``) and its ONNX file."""

    label: str
    onnx_path: Path


@dataclass
class ComparisonRow:
    """One model's figures, all measured here on the same parts."""

    label: str
    model_name: str
    input_size: int
    t_ok: float
    t_defect: float
    escape_rate: float
    false_reject_rate: float
    automation_rate: float
    accuracy: float
    corrupted_escape_rate: float  # mean over the suite, every severity
    corrupted_error: float
    relative_ce: float | None  # vs the first model (1.0 for itself)
    latency_ms_per_image: float
    cost_per_million: float
    escape_by_corruption: dict[str, float] = field(default_factory=dict)
    error_by_severity: list[float] = field(default_factory=list)  # clean, then severities 1–5


@dataclass
class Comparison:
    dataset_version: str
    n_test: int
    n_corrupted: int
    currency: str
    rows: list[ComparisonRow]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _band(meta: dict[str, Any], path: Path) -> BandResult:
    try:
        return BandResult(**meta["band"])
    except (KeyError, TypeError) as exc:
        msg = f"{path.name} carries no kensa review band in its metadata ({exc}); is it a kensa model?"
        raise ValueError(msg) from None


def _row(
    model: ComparedModel,
    ds: DatasetVersion,
    max_images: int,
    reference: dict[str, Any] | None,
    latency: Callable[[Path, int], float],
    cost_per_million: Callable[[float], float],
    show_progress: bool,
) -> tuple[ComparisonRow, dict[str, Any], int]:
    meta = read_metadata(model.onnx_path)
    classes = list(meta.get("classes", []))
    try:
        model_labels(classes, ds.classes, np.zeros(0, int))
    except ValueError as exc:
        raise ValueError(f"{model.label}: {exc}") from None
    size = int(meta["input_size"])
    band = _band(meta, model.onnx_path)
    sess = cpu_session(model.onnx_path)

    def predict(images: torch.Tensor) -> np.ndarray:
        return run_onnx(sess, images.permute(0, 2, 3, 1).contiguous().numpy())

    test = split_tensors(ds, "test", read_preprocess(meta))  # decoded as serving decodes for it
    labels = model_labels(classes, ds.classes, test.labels.numpy())  # defect types → one class
    clean = qc_metrics(predict(test.images), labels, classes, band.t_ok, band.t_defect)
    # The same seeded subset evaluate_predictor corrupts, so these match the recorded evaluation.
    idx = np.sort(np.random.default_rng(0).permutation(len(labels))[:max_images])
    rob = robustness_report(
        predict, test.images[idx], labels[idx], classes, band, reference, show_progress=show_progress
    )
    ms = latency(model.onnx_path, size)
    per = rob["per_corruption"]
    row = ComparisonRow(
        label=model.label,
        model_name=str(meta.get("model_name", "?")),
        input_size=size,
        t_ok=band.t_ok,
        t_defect=band.t_defect,
        escape_rate=clean["escape_rate"],
        false_reject_rate=clean["false_reject_rate"],
        automation_rate=clean["automation_rate"],
        accuracy=clean["accuracy"],
        corrupted_escape_rate=rob["corrupted_escape_rate"],
        corrupted_error=rob["corrupted_error"],
        relative_ce=1.0 if reference is None else rob["mean_relative_ce"],
        latency_ms_per_image=ms,
        cost_per_million=cost_per_million(ms),
        escape_by_corruption={
            n: float(np.mean([per[n][str(s)]["escape_rate"] for s in SEVERITIES])) for n in per
        },
        error_by_severity=[rob["clean"]["error"]]
        + [float(np.mean([per[n][str(s)]["error"] for n in per])) for s in SEVERITIES],
    )
    return row, rob, len(labels)


def compare_models(
    first: ComparedModel,
    second: ComparedModel,
    ds: DatasetVersion,
    *,
    latency: Callable[[Path, int], float],
    cost_per_million: Callable[[float], float],
    currency: str = "USD",
    max_robustness_images: int = 192,
    show_progress: bool = True,
) -> Comparison:
    """Evaluate both ONNX files on ``ds``'s test split and its corrupted copies.

    ``latency(onnx_path, input_size)`` gives ms per image at the serving batch size and
    ``cost_per_million(ms)`` prices a million parts at that speed (both from the caller's plan).
    """
    row_a, rob_a, n = _row(first, ds, max_robustness_images, None, latency, cost_per_million, show_progress)
    reference = {**rob_a, "model": first.label}
    row_b, _, _ = _row(second, ds, max_robustness_images, reference, latency, cost_per_million, show_progress)
    return Comparison(ds.version, n, int(rob_a["n_images"]), currency, [row_a, row_b])


def plot_comparison(comparison: Comparison, path: Path) -> Path:
    """QC rates, escape per corruption, error vs severity, and speed/cost in one picture."""
    a, b = comparison.rows
    colours = ("#4c72b0", "#dd8452")
    # A Figure of its own, never pyplot: no global state, no backend chosen for the caller.
    fig = Figure(figsize=(12, 8.5))
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    names = ["escape", "false reject", "automation", "corrupted escape"]
    keys = ["escape_rate", "false_reject_rate", "automation_rate", "corrupted_escape_rate"]
    x = np.arange(len(names))
    for i, (row, colour) in enumerate(zip((a, b), colours, strict=True)):
        vals = [getattr(row, k) for k in keys]
        bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, color=colour, label=f"{row.label} {row.model_name}")
        ax.bar_label(bars, [f"{v:.1%}" for v in vals], fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of parts")
    ax.set_title(f"QC on {comparison.n_test} test parts (each model's own band)")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[0, 1]
    corruptions = list(a.escape_by_corruption)
    y = np.arange(len(corruptions))
    for i, (row, colour) in enumerate(zip((a, b), colours, strict=True)):
        vals = [row.escape_by_corruption[c] for c in corruptions]
        ax.barh(y + (i - 0.5) * 0.38, vals, 0.38, color=colour, label=row.label)
    ax.set_yticks(y, corruptions, fontsize=8)
    ax.invert_yaxis()
    worst = max((max(r.escape_by_corruption.values(), default=0.0) for r in (a, b)), default=0.0)
    ax.set_xlim(0, min(1.0, max(0.05, worst * 1.2)))  # zoomed: a few % of escapes must be visible
    ax.set_xlabel("escape rate (mean over severities 1–5)")
    ax.set_title(f"Escapes under shop-floor corruptions ({comparison.n_corrupted} parts)")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    levels = ["clean", *(str(s) for s in SEVERITIES)]
    for row, colour in zip((a, b), colours, strict=True):
        rce = "ref" if row is a else ("n/a" if row.relative_ce is None else f"{row.relative_ce:.2f}")
        ax.plot(levels, row.error_by_severity, "o-", color=colour, label=f"{row.label} (rCE {rce})")
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("classification error")
    ax.set_ylim(0, 1)
    ax.set_title("Error as corruption grows (relative CE vs the first model)")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    labels = [r.label for r in (a, b)]
    bars = ax.bar(labels, [r.latency_ms_per_image for r in (a, b)], color=colours, width=0.5)
    ax.bar_label(
        bars,
        [
            f"{r.latency_ms_per_image:.2f} ms · {r.cost_per_million:.3f} {comparison.currency}/M"
            for r in (a, b)
        ],
        fontsize=9,
    )
    ax.set_ylabel("ms per image (ONNX Runtime, CPU, serving batch)")
    ax.set_ylim(0, max(r.latency_ms_per_image for r in (a, b)) * 1.3)
    ax.set_title(f"Speed and serving cost per million parts ({comparison.currency})")
    fig.suptitle(f"{a.label} vs {b.label} on dataset {comparison.dataset_version[:12]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
