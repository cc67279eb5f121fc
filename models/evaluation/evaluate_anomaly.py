"""QC evaluation of an anomaly run: the good-parts band, test metrics the labels support, plots.

Writes ``band.json`` and ``metrics.json`` in the shape a classifier's evaluation writes them
(``escape_rate``, ``false_reject_rate``, ``automation_rate``, ``band``, counts), so the KPI gate,
the registry and the console read both kinds alike, plus what only an anomaly model has: image
AUROC, pixel AUROC against defect masks where the dataset has them, and ``labels_support`` saying
which rates are certified and which are only measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from kensa.models.data.ingest import ImageRecord, load_dataset
from kensa.models.evaluation.anomaly_band import calibrate_anomaly_band
from kensa.models.evaluation.evaluate_run import (
    BAND_NAME,
    METRICS_NAME,
    BandPolicy,
    _write_json,
    robustness_report,
)
from kensa.models.evaluation.plots import plot_score_histograms
from kensa.models.evaluation.qc import qc_metrics
from kensa.models.evaluation.thresholds import apply_band
from kensa.models.nets.patchcore import score_images
from kensa.models.train.anomaly import ANOMALY_CLASSES, good_images, load_anomaly_run
from kensa.models.train.cpu import configure_cpu_training


def record_mask(r: ImageRecord, size: int) -> np.ndarray | None:
    """The defect mask a record's manifest names, resized to the model input; None without one."""
    rel = r.metadata.get("mask", "")
    if not rel:
        return None
    with Image.open(r.root / rel) as im:
        return np.asarray(im.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 127


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else 0.0


def scores_as_probs(scores: np.ndarray) -> np.ndarray:
    """(N, 2) ``ok``/``defect_anomaly`` probabilities of normalised scores, as the ONNX graph gives."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    return np.stack([1.0 - s, s], axis=1)


def evaluate_anomaly_run(
    run_dir: Path,
    policy: BandPolicy | None = None,
    corruptions: bool = False,
    max_robustness_images: int = 256,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Calibrate the band on the calibration split and measure the test split of the run's data.

    With ``corruptions`` the test parts (a seeded subset of ``max_robustness_images``) also go
    through the shop-floor corruption suite, judged with the same band as a classifier's are, so
    the gate's corrupted escape rate reads both kinds alike.
    """
    policy = policy or BandPolicy()
    configure_cpu_training()
    run = load_anomaly_run(run_dir)
    ds = load_dataset(run.dataset_root)
    recipe = run.preprocess
    calib, test = ds.split("calibration"), ds.split("test")
    s_cal, _ = score_images(run.net, good_images(ds, calib, recipe))
    y_cal = np.array([r.label != "ok" for r in calib])
    band = calibrate_anomaly_band(
        s_cal, y_cal, alpha=policy.alpha, delta=policy.delta, max_false_reject=policy.max_false_reject
    )
    _write_json(run_dir / BAND_NAME, band.to_dict())

    s_test, maps = score_images(run.net, good_images(ds, test, recipe))
    y = np.array([r.label != "ok" for r in test])
    verdicts = apply_band(np.clip(s_test, 0, 1), band.t_ok, band.t_defect)
    # Defect vs good at the score's midpoint, the ONNX graph's argmax: the error the robustness
    # suite grows under corruption (a classifier's is over its defect types).
    binary = qc_metrics(scores_as_probs(s_test), y.astype(int), ANOMALY_CLASSES, band.t_ok, band.t_defect)
    metrics: dict[str, Any] = {
        "kind": "anomaly",
        "model": "patchcore",
        "classes": ANOMALY_CLASSES,
        "dataset_version": ds.version,
        "trained_on_dataset_version": run.dataset_version,
        "n_test": len(test),
        "n_good": int((~y).sum()),
        "n_defective": int(y.sum()),
        "false_reject_rate": _rate(verdicts[~y] == "defect"),
        "escape_rate": _rate(verdicts[y] == "ok") if y.any() else None,
        "automation_rate": _rate(verdicts != "review"),
        "review_rate": _rate(verdicts == "review"),
        "accuracy": binary["accuracy"],
        "error": binary["error"],
        "defect_auroc": float(roc_auc_score(y, s_test)) if y.any() and (~y).any() else None,
        "band": band.to_dict(),
        "fit": run.fit,
        "labels_support": {
            "false_reject_rate": "certified" if band.false_reject_guaranteed else "measured",
            "escape_rate": "certified"
            if band.escape_guaranteed
            else ("measured, not certified" if y.any() else "unknown: no defective test parts"),
        },
    }
    if corruptions:
        images = good_images(ds, test, recipe)
        idx = np.sort(np.random.default_rng(0).permutation(len(test))[:max_robustness_images])

        def predict(batch: torch.Tensor) -> np.ndarray:  # (N, 3, H, W) uint8, as the suite hands them
            return scores_as_probs(score_images(run.net, batch.permute(0, 2, 3, 1).contiguous())[0])

        metrics["robustness"] = robustness_report(
            predict,
            images[idx].permute(0, 3, 1, 2).contiguous(),
            y[idx].astype(int),
            ANOMALY_CLASSES,
            band,
            show_progress=show_progress,
        )
    masks = [record_mask(r, run.input_size) for r in test]
    if any(m is not None for m in masks):
        truth = np.stack([m if m is not None else np.zeros(maps.shape[1:], bool) for m in masks])
        metrics["pixel_auroc"] = float(roc_auc_score(truth.ravel(), maps.ravel()))
    plot_score_histograms(
        np.clip(s_test, 0, 1),
        y.astype(int),
        ANOMALY_CLASSES,
        band.t_ok,
        band.t_defect,
        run_dir / "plots" / "score_histograms.png",
    )
    _write_json(run_dir / METRICS_NAME, metrics)
    return metrics


def anomaly_images(run_dir: Path, split: str) -> torch.Tensor:
    """(N, S, S, 3) uint8 images of a split of the run's dataset, decoded with the run's recipe."""
    run = load_anomaly_run(run_dir)
    ds = load_dataset(run.dataset_root)
    return good_images(ds, ds.split(split), run.preprocess)
