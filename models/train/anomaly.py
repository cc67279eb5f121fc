"""An anomaly run: PatchCore fitted on a dataset version's good training parts, saved as a run dir.

The run directory has the classifier's shape (``checkpoint.pt``, then ``band.json`` and
``metrics.json`` from evaluation, then the ONNX file from export), so the same commands and flows
can carry either kind; ``checkpoint.pt`` says ``"kind": "anomaly"``. The checkpoint holds tensors
and plain values only and is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kensa import __version__
from kensa.models.data.imageprep import Preprocess, preprocess_from_config
from kensa.models.data.ingest import DatasetVersion, ImageRecord, load_dataset
from kensa.models.evaluation.qc import ANOMALY_CLASS, OK
from kensa.models.nets.patchcore import (
    PatchCoreConfig,
    PatchCoreNet,
    ProgressCallback,
    blur_sigma_for,
    build_patch_features,
    fit_patchcore,
)
from kensa.models.train.cpu import configure_cpu_training
from kensa.models.train.trainer import CHECKPOINT_NAME, dataset_image_size, record_tensors

ANOMALY_FORMAT = "kensa-anomaly/1"
ANOMALY_MODEL = "patchcore"
ANOMALY_CLASSES = [OK, ANOMALY_CLASS]  # what an anomaly model's verdicts can name


@dataclass
class AnomalyRun:
    """A fitted anomaly model with the description its checkpoint carries."""

    net: PatchCoreNet
    config: dict[str, Any]
    input_size: int
    dataset_version: str
    dataset_root: Path
    fit: dict[str, Any]
    backbone: dict[str, Any] | None

    @property
    def preprocess(self) -> Preprocess:
        return preprocess_from_config(self.config, self.input_size)


def is_anomaly_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` (or a checkpoint file) holds an anomaly model."""
    path = run_dir / CHECKPOINT_NAME if run_dir.is_dir() else run_dir
    if not path.is_file():
        return False
    payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return isinstance(payload, dict) and payload.get("kind") == "anomaly"


def good_images(ds: DatasetVersion, records: list[ImageRecord], recipe: Preprocess | int) -> torch.Tensor:
    """(N, S, S, 3) uint8 images of ``records``, decoded as training and serving decode them."""
    return record_tensors(ds, records, recipe).images.permute(0, 2, 3, 1).contiguous()


def fit_anomaly_run(
    data_root: Path,
    out_dir: Path,
    config: PatchCoreConfig | None = None,
    image_size: int | None = None,
    fit: str = "letterbox",
    progress: ProgressCallback | None = None,
    fraction: float = 1.0,
) -> Path:
    """Fit PatchCore on the good parts of the training split; write ``out_dir/checkpoint.pt``.

    Works on any dataset version: a good-parts-only one (``--task anomaly``) or a classifier's,
    whose defective training parts are simply not used. ``fraction`` < 1 fits on a seeded share of
    the good training parts (the sweep's data axis), at least 2.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    config = config or PatchCoreConfig()
    configure_cpu_training()
    ds = load_dataset(data_root)
    size = image_size or dataset_image_size(ds)
    train_config = {
        "model": ANOMALY_MODEL,
        "image_size": size,
        "fit": fit,
        "fraction": fraction,
        **config.to_dict(),
    }
    recipe = preprocess_from_config(train_config, size)
    good = [r for r in ds.split("train") if r.label == "ok"]
    if fraction < 1.0 and len(good) > 2:
        n_keep = max(2, round(len(good) * fraction))
        keep = np.random.default_rng(config.seed).permutation(len(good))[:n_keep]
        good = [good[i] for i in sorted(keep)]
    if len(good) < 2:
        raise ValueError(f"the training split holds {len(good)} good parts; PatchCore needs at least 2")
    t0 = time.perf_counter()
    fitted = fit_patchcore(good_images(ds, good, recipe), config, progress)
    seconds = time.perf_counter() - t0
    summary = {
        "good_parts": len(good),
        "bank_parts": fitted.n_bank_parts,
        "holdout_parts": fitted.n_holdout_parts,
        "patches_seen": fitted.n_patches_seen,
        "bank_size": int(fitted.net.bank.shape[0]),
        "score_scale": fitted.scale,
        "fit_seconds": seconds,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": ANOMALY_FORMAT,
        "kind": "anomaly",
        "model_name": ANOMALY_MODEL,
        "classes": ANOMALY_CLASSES,
        "input_size": size,
        "config": train_config,
        "backbone": fitted.provenance,
        "dataset_version": ds.version,
        "dataset_root": str(ds.root.resolve()),
        "code_version": __version__,
        "fit": summary,
        "shapes": {
            "bank": list(fitted.net.bank.shape),
            "pca": list(fitted.net.pca_components.shape),
            "proj": list(fitted.net.proj.shape),
        },
        "state_dict": fitted.net.state_dict(),
    }
    path = out_dir / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    (out_dir / "train.json").write_text(json.dumps({"model": ANOMALY_MODEL, **summary}, indent=2))
    return path


def load_anomaly_run(run_dir: Path) -> AnomalyRun:
    """Rebuild a run's PatchCore model on the CPU, in eval mode (no weights package needed)."""
    path = run_dir / CHECKPOINT_NAME if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; run `kensa train --model patchcore` first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("kind") != "anomaly":
        raise ValueError(f"{path} is not an anomaly model (kind {payload.get('kind')!r})")
    cfg = PatchCoreConfig(
        **{k: payload["config"][k] for k in asdict(PatchCoreConfig()) if k in payload["config"]}
    )
    features, _ = build_patch_features(cfg.backbone, load_weights=False, fine=cfg.fine)
    bank_shape, pca_shape = payload["shapes"]["bank"], payload["shapes"]["pca"]
    # Fits before patch projection carry no "proj": the identity (raw patches) is what they used.
    state = dict(payload["state_dict"])
    state.setdefault("proj", torch.eye(bank_shape[1]))
    net = PatchCoreNet(
        features,
        torch.zeros(bank_shape),
        1.0,
        blur_sigma_for(cfg.blur_sigma, int(payload["input_size"])),
        torch.zeros(pca_shape[1]),
        torch.zeros(pca_shape),
        torch.zeros(state["proj"].shape),
    )
    net.load_state_dict(state)
    net.eval()
    return AnomalyRun(
        net=net,
        config=dict(payload["config"]),
        input_size=int(payload["input_size"]),
        dataset_version=payload["dataset_version"],
        dataset_root=Path(payload["dataset_root"]),
        fit=dict(payload["fit"]),
        backbone=payload.get("backbone"),
    )
