"""Model versions for the console's scene: contract ONNX models registered in MLflow, evaluated
on labelled grey parts, with metrics, kensa tags and plots recorded as flows record them."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from serving_helpers import CLASSES, SIZE

from kensa.registry import (
    ONNX_FILE,
    TAG_COST,
    TAG_DATASET_VERSION,
    TAG_KPI,
    TAG_PARITY,
    TAG_REGISTERED_BY,
    TAG_SHA256,
    TAG_SOURCE,
    TAG_STATUS,
    TAG_THRESHOLDS,
)

NAME = "qc-console"
# Serving cost per hour used for the cost-per-million figure (the ServingPlan default).
SERVING_COST_PER_HOUR = 0.40


def grey_parts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labelled parts for the contract model: good ones bright, defective ones dark, overlapping
    in the middle so that the review band and escapes are real (images (n, SIZE, SIZE, 3))."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(CLASSES), size=n, p=[0.6, 0.25, 0.15])
    level = np.where(labels == 0, rng.normal(185, 40, n), rng.normal(70, 40, n)).clip(0, 255)
    images = np.repeat(level[:, None, None, None], 3, axis=3) * np.ones((1, SIZE, SIZE, 1))
    images = images + rng.integers(-3, 4, images.shape)
    return images.clip(0, 255).astype(np.uint8), labels


def _latency_ms(session: ort.InferenceSession, images: np.ndarray) -> float:
    """Median time per image of a batch of 8 (the median: a shared CPU stalls now and then)."""
    batch = images[:8]
    session.run(["probs"], {"images": batch})
    times = []
    for _ in range(21):
        started = time.perf_counter()
        session.run(["probs"], {"images": batch})
        times.append((time.perf_counter() - started) * 1000 / len(batch))
    return float(np.median(times))


def evaluate_and_tag(
    uri: str,
    version: str,
    onnx_path: Path,
    *,
    t_ok: float,
    t_defect: float,
    registered_by: str,
    plots: bool,
) -> dict[str, float]:
    """Evaluate the version on labelled grey parts and record it as flows do: metrics on its run,
    kensa tags on the version, plots under ``plots/``."""
    from mlflow import MlflowClient

    from kensa.models.evaluation.qc import defect_scores, escape_automation_curve, qc_metrics

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    images, labels = grey_parts(240, seed=5)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probs = session.run(["probs"], {"images": images})[0].astype(np.float64)
    m = qc_metrics(probs, labels, CLASSES, t_ok, t_defect)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    sample = json.loads(meta["parity_sample"])
    replay = np.random.default_rng(sample["seed"]).integers(
        0, 256, (sample["n"], SIZE, SIZE, 3), dtype=np.uint8
    )
    parity = float(np.abs(session.run(["probs"], {"images": replay})[0] - np.array(sample["probs"])).max())
    latency = _latency_ms(session, images)
    per_million = latency / 1000 / 3600 * 1e6 * SERVING_COST_PER_HOUR
    metrics = {
        "test.escape_rate": m["escape_rate"],
        "test.false_reject_rate": m["false_reject_rate"],
        "test.automation_rate": m["automation_rate"],
        "latency_ms_per_image": latency,
        "cost.serving_per_million": per_million,
        "parity_max_abs_diff": parity,
    }
    run_id = client.get_model_version(NAME, version).run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    tags = {
        TAG_STATUS: "candidate",
        TAG_REGISTERED_BY: registered_by,
        TAG_SOURCE: "register",
        TAG_DATASET_VERSION: "grey-parts-5",
        TAG_THRESHOLDS: json.dumps({"t_ok": t_ok, "t_defect": t_defect}),
        TAG_KPI: json.dumps({"passed": True, "escape_rate": m["escape_rate"], "n_test": m["n"]}),
        TAG_COST: json.dumps({"serving_per_million": round(per_million, 4), "currency": "USD"}),
        TAG_PARITY: json.dumps(
            {"max_abs_prob_diff": parity, "n": sample["n"], "passed": parity <= sample["atol"]}
        ),
    }
    for key, value in tags.items():
        client.set_model_version_tag(NAME, version, key, value)
    if plots:
        from kensa.models.evaluation.plots import plot_confusion, plot_escape_curve, plot_score_histograms

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            plot_score_histograms(
                defect_scores(probs, CLASSES), labels, CLASSES, t_ok, t_defect, out / "score_histograms.png"
            )
            plot_escape_curve(
                escape_automation_curve(probs, labels, CLASSES), m, out / "escape_vs_automation.png"
            )
            plot_confusion(m["confusion_matrix"], CLASSES, out / "confusion_matrix.png")
            client.log_artifacts(run_id, str(out), "plots")
    return metrics


def register_version(client: Any, onnx_path: Path, experiment_id: str) -> str:
    """Register ``onnx_path`` as a new version: the file under the run's ``model/`` artifacts
    (where serving's registry source finds it) and its SHA-256 tag. Leaner than
    ``mlflow.onnx.log_model`` (no environment capture), which keeps the scene quick to build."""
    from mlflow.exceptions import MlflowException

    from kensa.serving.inference.artifact import file_sha256

    run = client.create_run(experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / ONNX_FILE
        staged.write_bytes(onnx_path.read_bytes())
        client.log_artifact(run.info.run_id, str(staged), "model")
    with contextlib.suppress(MlflowException):  # registered with an earlier version
        client.create_registered_model(NAME)
    mv = client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_model_version_tag(NAME, mv.version, TAG_SHA256, file_sha256(onnx_path))
    client.set_terminated(run.info.run_id)
    return str(mv.version)
