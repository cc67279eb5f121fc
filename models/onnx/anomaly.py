"""ONNX export of an anomaly model: uint8 NHWC in; probs, drift features, score and anomaly_map out.

Everything serving needs rides in the graph and its metadata: normalisation (pixel scaling, the
backbone's mean and std, the score scale), the memory bank, the band's thresholds, the input size
and the parity sample. The parity check compares scores *and* maps with PyTorch eager, and the
verdicts the band gives, so the exported model cannot quietly disagree with the one evaluated
(anomalib #2483, #3261).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kensa import __version__
from kensa.models.evaluation.thresholds import apply_band
from kensa.models.nets.patchcore import PatchCoreNet
from kensa.models.onnx.contract import (
    PARITY_SAMPLE_SEED,
    PARITY_SAMPLE_SHAPE,
    PREPROCESS_KEY,
    parity_sample_images,
    sha256_file,
)
from kensa.models.onnx.export import TIE_EPS, ParityError, cpu_session, write_onnx

# probs and features first: the classifier's contract, which serving, the band and drift read;
# score and anomaly_map are what only an anomaly model has.
OUTPUTS = ["probs", "features", "score", "anomaly_map"]
SCORE_ATOL = 1e-4
MAP_ATOL = 1e-3  # the map goes through a resize and a blur: more float32 sums than the score


@torch.no_grad()
def _torch_outputs(net: PatchCoreNet, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for i in range(0, len(images), batch):
        _, _, s, m = net(torch.from_numpy(images[i : i + batch]))
        scores.append(s.numpy())
        maps.append(m.numpy())
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps).astype(np.float64)


def _onnx_outputs(path: Path, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    sess = cpu_session(path)
    scores, maps = [], []
    for i in range(0, len(images), batch):
        s, m = sess.run(["score", "anomaly_map"], {"images": images[i : i + batch]})
        scores.append(s)
        maps.append(m)
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps).astype(np.float64)


def check_anomaly_parity(
    net: PatchCoreNet, path: Path, images: np.ndarray, band: dict[str, Any]
) -> dict[str, Any]:
    """ONNX Runtime (CPU, FP32) against PyTorch eager on the same uint8 NHWC images."""
    s_ref, m_ref = _torch_outputs(net, images)
    s_got, m_got = _onnx_outputs(path, images)
    score_diff = float(np.abs(s_ref - s_got).max())
    map_diff = float(np.abs(m_ref - m_got).max())
    tie = (np.abs(s_ref - band["t_ok"]) < TIE_EPS) | (np.abs(s_ref - band["t_defect"]) < TIE_EPS)
    v_ref = apply_band(np.clip(s_ref, 0, 1), band["t_ok"], band["t_defect"])
    v_got = apply_band(np.clip(s_got, 0, 1), band["t_ok"], band["t_defect"])
    agreement = float((v_ref[~tie] == v_got[~tie]).mean()) if (~tie).any() else 1.0
    return {
        "n_images": len(images),
        "max_abs_score_diff": score_diff,
        "max_abs_map_diff": map_diff,
        # probs are (1 - s, s) of the clipped score, so they move no more than the score does:
        # the key every model's parity report carries (flows log it as parity_max_abs_diff).
        "max_abs_prob_diff": score_diff,
        "score_tolerance": SCORE_ATOL,
        "map_tolerance": MAP_ATOL,
        "verdict_agreement": agreement,
        "threshold_ties": int(tie.sum()),
        "passed": bool(score_diff <= SCORE_ATOL and map_diff <= MAP_ATOL and agreement == 1.0),
    }


def export_anomaly_model(
    net: PatchCoreNet,
    input_size: int,
    band: dict[str, Any],
    out: Path,
    parity_images: np.ndarray,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out`` with metadata and check parity on ``parity_images`` (N, S, S, 3) uint8.

    Returns the export report (path, sha256, parity); raises :class:`ParityError` and removes the
    file when the graph does not reproduce PyTorch.
    """
    net = net.eval()
    sample = parity_sample_images(input_size)
    s_sample, _ = _torch_outputs(net, sample)
    metadata: dict[str, Any] = {
        "kensa_format": "kensa-onnx/1",
        "kind": "anomaly",
        "outputs": OUTPUTS,
        "input_size": input_size,
        "input_layout": "NHWC uint8 RGB",
        "classes": ["ok", "defect_anomaly"],
        "thresholds": {k: band[k] for k in ("t_ok", "t_defect", "alpha", "delta", "guaranteed") if k in band},
        "band": band,
        "score_scale": float(net.scale),
        "feature_dims": int(net.pca_components.shape[0]),
        "bank_size": int(net.bank.shape[0]),
        "code_version": __version__,
        "parity_sample": {
            "seed": PARITY_SAMPLE_SEED,
            "n": PARITY_SAMPLE_SHAPE,
            "probs": np.round(np.stack([1 - s_sample, s_sample], axis=1), 6).tolist(),
            "scores": np.round(s_sample, 6).tolist(),
            "atol": 1e-3,
        },
        **(extra_metadata or {}),
    }
    write_onnx(net, input_size, out, metadata, OUTPUTS)
    parity = check_anomaly_parity(net, out, parity_images, band)
    out.with_suffix(".parity.json").write_text(json.dumps(parity, indent=2))
    if not parity["passed"]:
        out.unlink(missing_ok=True)
        msg = (
            f"parity failed: max |Δscore| = {parity['max_abs_score_diff']:.2e} (limit {SCORE_ATOL}), "
            f"max |Δmap| = {parity['max_abs_map_diff']:.2e} (limit {MAP_ATOL}), verdict agreement "
            f"{parity['verdict_agreement']:.2%} (need 100%)"
        )
        raise ParityError(msg)
    return {"path": str(out), "sha256": sha256_file(out), "parity": parity}


def export_anomaly_run(run_dir: Path, out: Path, parity_images: int = 64) -> dict[str, Any]:
    """Export an evaluated anomaly run (``band.json`` from ``kensa evaluate``) with parity."""
    from kensa.models.evaluation.evaluate_anomaly import anomaly_images
    from kensa.models.train.anomaly import load_anomaly_run
    from kensa.models.train.cpu import configure_cpu_training

    band_path = run_dir / "band.json"
    if not band_path.is_file():
        msg = f"{band_path} is missing; run `kensa evaluate {run_dir}` first to calibrate the band"
        raise FileNotFoundError(msg)
    band = json.loads(band_path.read_text())
    configure_cpu_training()
    run = load_anomaly_run(run_dir)
    images = torch.cat([anomaly_images(run_dir, "calibration"), anomaly_images(run_dir, "test")])
    meta = {
        "model_name": "patchcore",
        "dataset_version": run.dataset_version,
        "training_config": run.config,
        PREPROCESS_KEY: run.preprocess.to_dict(),
        **({"backbone": run.backbone} if run.backbone else {}),
    }
    report = export_anomaly_model(run.net, run.input_size, band, out, images[:parity_images].numpy(), meta)
    out.with_suffix(".export.json").write_text(json.dumps(report, indent=2))
    return report
