"""QC evaluation of a trained run: band calibration, test metrics, slices, robustness, plots."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from kensa.models.data.imageprep import Preprocess, preprocess_from_config
from kensa.models.data.ingest import DatasetVersion, load_dataset
from kensa.models.evaluation.corruptions import apply_corruption, corruption_names
from kensa.models.evaluation.plots import (
    plot_confusion,
    plot_escape_curve,
    plot_robustness_heatmap,
    plot_score_histograms,
)
from kensa.models.evaluation.qc import defect_scores, escape_automation_curve, qc_metrics, sliced_metrics
from kensa.models.evaluation.thresholds import BandResult, calibrate_band
from kensa.models.train.cpu import configure_cpu_training
from kensa.models.train.trainer import load_checkpoint, predict_probs, split_tensors

METRICS_NAME = "metrics.json"
BAND_NAME = "band.json"
SEVERITIES = (1, 2, 3, 4, 5)

Predictor = Callable[[torch.Tensor], np.ndarray]  # uint8 (N,3,H,W) -> probs (N,C)


@dataclass(frozen=True)
class BandPolicy:
    """The targets the review band is calibrated for (from the project config's KPI)."""

    alpha: float = 0.02  # max escape rate among defective parts
    delta: float = 0.1  # 1 − confidence
    max_false_reject: float = 0.05


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    msg = f"not JSON serialisable: {type(o).__name__}"
    raise TypeError(msg)


def robustness_report(
    predict: Predictor,
    images: torch.Tensor,
    labels: np.ndarray,
    classes: list[str],
    band: BandResult,
    reference: dict[str, Any] | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Escape, false reject and error per corruption × severity, and relative CE per type.

    Relative corruption error as ImageNet-C defines it: for corruption c,
    rCE_c = Σ_s (E_{s,c} − E_clean) / Σ_s (E^ref_{s,c} − E^ref_clean), with E the classification
    error and ref a fixed reference model's report. Without a reference, rCE is null and the
    absolute gap (mean over severities of E_{s,c} − E_clean) is still reported.
    """
    keys = ("escape_rate", "false_reject_rate", "error", "accuracy", "automation_rate")
    clean_full = qc_metrics(predict(images), labels, classes, band.t_ok, band.t_defect)
    clean = {k: clean_full[k] for k in keys}
    per: dict[str, dict[str, dict[str, float]]] = {}
    names = corruption_names()
    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("robustness", total=len(names) * len(SEVERITIES))
        for name in names:
            per[name] = {}
            for sev in SEVERITIES:
                corrupted = apply_corruption(images, name, sev, seed=seed)
                m = qc_metrics(predict(corrupted), labels, classes, band.t_ok, band.t_defect)
                per[name][str(sev)] = {k: m[k] for k in keys}
                progress.advance(task)
    gap: dict[str, float] = {}
    rce: dict[str, float | None] = {}
    for name in names:
        errs = [per[name][str(s)]["error"] for s in SEVERITIES]
        gap[name] = float(np.mean(errs) - clean["error"])
        rce[name] = None
        if reference and name in reference.get("per_corruption", {}):
            ref_clean = reference["clean"]["error"]
            ref_sum = sum(reference["per_corruption"][name][str(s)]["error"] - ref_clean for s in SEVERITIES)
            own_sum = sum(e - clean["error"] for e in errs)
            # A reference that did not degrade gives no scale; keep it null rather than divide by ~0.
            rce[name] = float(own_sum / ref_sum) if abs(ref_sum) > 1e-9 else None
    valid = [v for v in rce.values() if v is not None]
    corrupted_escape = float(np.mean([per[n][str(s)]["escape_rate"] for n in names for s in SEVERITIES]))
    corrupted_error = float(np.mean([per[n][str(s)]["error"] for n in names for s in SEVERITIES]))
    return {
        "clean": clean,
        "per_corruption": per,
        "error_gap": gap,
        "mean_error_gap": float(np.mean(list(gap.values()))),
        "relative_ce": rce,
        "mean_relative_ce": float(np.mean(valid)) if valid else None,
        "corrupted_escape_rate": corrupted_escape,
        "corrupted_error": corrupted_error,
        "reference": reference.get("model") if reference else None,
        "severities": list(SEVERITIES),
        "n_images": len(labels),
    }


def _groups(ds: DatasetVersion, split: str) -> dict[str, list[str | None]]:
    records = ds.split(split)
    groups: dict[str, list[str | None]] = {
        "line": [r.line for r in records],
        "camera": [r.camera for r in records],
    }
    variants = [r.metadata.get("variant") for r in records]
    if any(v is not None for v in variants):
        groups["variant"] = [str(v) if v is not None else None for v in variants]
    return groups


def evaluate_predictor(
    predict: Predictor,
    ds: DatasetVersion,
    run_dir: Path,
    *,
    input_size: Preprocess | int,
    model_name: str,
    trained_on_dataset_version: str | None = None,
    corruptions: bool = False,
    policy: BandPolicy | None = None,
    reference_report: dict[str, Any] | None = None,
    max_robustness_images: int = 256,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate any model, given as ``predict`` (uint8 (N,3,S,S) → probs (N,C) in ``ds.classes``).

    The one QC evaluation every model goes through (a kensa run, a data scientist's own module, a
    foreign ONNX graph): calibrate the band, measure the test split, plot, and optionally run the
    corruption suite. Writes ``band.json``, ``metrics.json`` and PNGs under ``run_dir/plots``.
    ``input_size`` is the model's image recipe (a bare size means the legacy square resize).
    """
    policy = policy or BandPolicy()
    # The corruption suite pushes thousands of images through the model: the same threads and
    # allocator settings as training, or the system time matches the user time (measured: 3m27 s).
    configure_cpu_training()
    run_dir.mkdir(parents=True, exist_ok=True)
    calib = split_tensors(ds, "calibration", input_size)
    test = split_tensors(ds, "test", input_size)
    classes = list(ds.classes)
    ok_idx = classes.index("ok")
    calib_probs = predict(calib.images)
    band = calibrate_band(
        defect_scores(calib_probs, classes),
        calib.labels.numpy() != ok_idx,
        alpha=policy.alpha,
        delta=policy.delta,
        max_false_reject=policy.max_false_reject,
    )
    _write_json(run_dir / BAND_NAME, band.to_dict())

    probs = predict(test.images)
    labels = test.labels.numpy()
    metrics = qc_metrics(probs, labels, classes, band.t_ok, band.t_defect)
    metrics["slices"] = sliced_metrics(probs, labels, classes, band.t_ok, band.t_defect, _groups(ds, "test"))
    metrics["band"] = band.to_dict()
    metrics["model"] = model_name
    metrics["classes"] = classes
    metrics["dataset_version"] = ds.version
    metrics["trained_on_dataset_version"] = trained_on_dataset_version
    curve = escape_automation_curve(probs, labels, classes)
    metrics["escape_automation_curve"] = curve

    plots = run_dir / "plots"
    plot_confusion(metrics["confusion_matrix"], classes, plots / "confusion_matrix.png")
    plot_score_histograms(
        defect_scores(probs, classes),
        labels,
        classes,
        band.t_ok,
        band.t_defect,
        plots / "score_histograms.png",
    )
    plot_escape_curve(curve, metrics, plots / "escape_vs_automation.png")

    if corruptions:
        # Corruptions run on a fixed, seeded subset so every model size sees the same parts.
        idx = np.random.default_rng(0).permutation(len(labels))[:max_robustness_images]
        idx.sort()
        metrics["robustness"] = robustness_report(
            predict,
            test.images[idx],
            labels[idx],
            classes,
            band,
            reference_report,
            show_progress=show_progress,
        )
        plot_robustness_heatmap(metrics["robustness"], "error", plots / "robustness_error.png")
        plot_robustness_heatmap(metrics["robustness"], "escape_rate", plots / "robustness_escape.png")
    _write_json(run_dir / METRICS_NAME, metrics)
    return metrics


def load_reference_report(reference: Path) -> dict[str, Any]:
    """The robustness report of an evaluated run dir, as relative CE's reference."""
    ref_metrics = json.loads((reference / METRICS_NAME).read_text())
    ref_report = ref_metrics.get("robustness")
    if ref_report is None:
        msg = f"reference {reference} has no robustness section; evaluate it with --corruptions"
        raise ValueError(msg)
    return {**ref_report, "model": ref_metrics.get("model")}


def evaluate_run(
    run_dir: Path,
    data_root: Path | None = None,
    corruptions: bool = False,
    policy: BandPolicy | None = None,
    reference: Path | None = None,
    max_robustness_images: int = 256,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``run_dir`` on its dataset: calibrate the band, measure the test split, plot.

    Writes ``band.json``, ``metrics.json`` and PNGs under ``run_dir/plots``; returns the metrics.
    """
    loaded = load_checkpoint(run_dir)
    ds = load_dataset(data_root or loaded.dataset_root)
    if list(ds.classes) != loaded.classes:
        msg = f"dataset classes {list(ds.classes)} differ from the model's {loaded.classes}"
        raise ValueError(msg)
    # Evaluating on another dataset version is allowed (new data from the line); metrics.json
    # records both versions, and the band is calibrated on the data evaluated here.
    ref_report = load_reference_report(reference) if corruptions and reference is not None else None

    def predict(images: torch.Tensor) -> np.ndarray:
        return predict_probs(loaded.model, images)

    return evaluate_predictor(
        predict,
        ds,
        run_dir,
        input_size=preprocess_from_config(loaded.config, loaded.input_size),
        model_name=loaded.model_name,
        trained_on_dataset_version=loaded.dataset_version,
        corruptions=corruptions,
        policy=policy,
        reference_report=ref_report,
        max_robustness_images=max_robustness_images,
        show_progress=show_progress,
    )
