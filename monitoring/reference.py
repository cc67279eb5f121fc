"""Reference profiles: the drift features of a model's calibration split, saved with the model version.

A profile holds, per calibration part, the image statistics, output statistics, the ONNX
``features`` and the true label, plus what the model promised (classes, review-band thresholds).
It is one ``.npz`` file, logged as an MLflow artifact of the run that registered the model version
(``monitoring/reference.npz``) and named in the version's ``kensa.reference`` tag, so the monitor
finds the reference of exactly the model that served a prediction.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from kensa.monitoring.estimate import Calibrator, fit_calibrator
from kensa.monitoring.features import SCALAR_COLUMNS, FeatureTable, build_table, image_stats
from kensa.settings import Settings

log = logging.getLogger("kensa.monitoring.reference")

TAG_REFERENCE = "kensa.reference"  # model-version tag: artifact URI of the reference profile
REFERENCE_ARTIFACT_DIR = "monitoring"
REFERENCE_FILE = "reference.npz"
FORMAT = "kensa-reference/1"
# A camera with fewer reference parts than this is compared with the whole reference instead.
MIN_CAMERA_ROWS = 100
SCORE = SCALAR_COLUMNS.index("defect_score")


@dataclass
class ReferenceProfile:
    """Drift features of the reference parts and the model facts needed to read them."""

    table: FeatureTable
    model_name: str
    thresholds: dict[str, float]  # t_ok, t_defect on the defect score
    dataset_version: str = ""
    split: str = "calibration"
    model_version: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def classes(self) -> tuple[str, ...]:
        return self.table.classes

    def for_camera(self, camera_id: str | None) -> tuple[FeatureTable, str | None]:
        """The reference rows of one camera (and its id), or all rows when it has too few."""
        if camera_id is not None:
            mask = np.array([c == camera_id for c in self.table.cameras], dtype=bool)
            if mask.sum() >= MIN_CAMERA_ROWS:
                return self.table.take(mask), camera_id
        return self.table, None

    def verdict_rates(self, table: FeatureTable | None = None) -> dict[str, float]:
        """Share of reference parts the model judges ``defect`` and ``review``."""
        t = table or self.table
        s = t.scalars[:, SCORE]
        defect = s >= self.thresholds["t_defect"]
        review = (s > self.thresholds["t_ok"]) & ~defect
        return {"defect_rate": float(defect.mean()), "review_rate": float(review.mean())}

    def calibrator(self) -> Calibrator:
        """Platt scaling of the defect score, fitted on the labelled reference parts."""
        if self.table.labels is None:
            raise ValueError("this reference has no labels; a label-free estimate needs them")
        defective = self.table.labels != self.classes.index("ok")
        return fit_calibrator(self.table.scalars[:, SCORE], defective)

    def to_bytes(self) -> bytes:
        meta = {
            "format": FORMAT,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "thresholds": self.thresholds,
            "dataset_version": self.dataset_version,
            "split": self.split,
            "created_at": self.created_at,
            "classes": list(self.classes),
            "cameras": self.table.cameras,
        }
        buf = io.BytesIO()
        labels = self.table.labels if self.table.labels is not None else np.zeros(0, dtype=np.int64)
        np.savez_compressed(
            buf,
            scalars=self.table.scalars,
            embedding=self.table.embedding,
            probs=self.table.probs,
            labels=labels,
            meta=np.array(json.dumps(meta, sort_keys=True)),
        )
        return buf.getvalue()

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    def digest(self) -> str:
        """Content hash of the numbers (cache key for calibrated policies)."""
        h = hashlib.sha256()
        for arr in (self.table.scalars, self.table.embedding, self.table.probs):
            h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
        h.update(json.dumps([self.table.cameras, self.thresholds], sort_keys=True).encode())
        return h.hexdigest()[:16]


def load_reference(path: Path) -> ReferenceProfile:
    """Read a profile written by ``ReferenceProfile.save``; ``ValueError`` if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            labels = data["labels"]
            table = FeatureTable(
                scalars=data["scalars"],
                embedding=data["embedding"],
                probs=data["probs"],
                classes=tuple(meta["classes"]),
                cameras=list(meta["cameras"]),
                labels=labels if len(labels) else None,
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a kensa reference profile: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; expected {FORMAT}")
    return ReferenceProfile(
        table=table,
        model_name=meta["model_name"],
        thresholds={k: float(v) for k, v in meta["thresholds"].items()},
        dataset_version=meta.get("dataset_version", ""),
        split=meta.get("split", "calibration"),
        model_version=meta.get("model_version"),
        created_at=meta.get("created_at", ""),
    )


def profile_from_images(
    images: np.ndarray,
    onnx_path: Path,
    *,
    labels: np.ndarray | None = None,
    cameras: list[str | None] | None = None,
    batch: int = 64,
) -> ReferenceProfile:
    """Run the ONNX model on uint8 NHWC ``images`` and profile them (stats, probs, features)."""
    import onnxruntime as ort

    from kensa.models.onnx.contract import read_metadata

    meta = read_metadata(onnx_path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    probs, feats = [], []
    for i in range(0, len(images), batch):
        p, f = sess.run(["probs", "features"], {"images": images[i : i + batch]})
        probs.append(p)
        feats.append(f)
    thresholds = meta.get("thresholds") or {}
    table = build_table(
        [image_stats(img) for img in images],
        np.concatenate(probs).astype(np.float64),
        np.concatenate(feats).astype(np.float64),
        list(meta["classes"]),
        cameras=cameras,
        labels=labels,
    )
    return ReferenceProfile(
        table=table,
        model_name=str(meta.get("model_name", "")),
        thresholds={"t_ok": float(thresholds["t_ok"]), "t_defect": float(thresholds["t_defect"])},
        dataset_version=str(meta.get("dataset_version", "")),
    )


def build_reference(onnx_path: Path, dataset_root: Path, *, split: str = "calibration") -> ReferenceProfile:
    """The reference profile of an exported model on one split of its dataset version."""
    from kensa.models.data.ingest import load_dataset
    from kensa.models.data.parts import load_image
    from kensa.models.onnx.contract import read_metadata, read_preprocess

    ds = load_dataset(dataset_root)
    meta = read_metadata(onnx_path)
    recipe = read_preprocess(meta)  # the pixels serving will feed it
    records = ds.split(split)
    if not records:
        raise ValueError(f"dataset {dataset_root} has no {split} parts to build a reference from")
    images = np.stack([load_image(r.absolute_path, recipe).permute(1, 2, 0).numpy() for r in records])
    index = {c: i for i, c in enumerate(ds.classes)}
    if meta.get("kind") == "anomaly":
        # The model's classes are ok and defect_anomaly: every defect type is its class 1.
        index = {c: (0 if c == "ok" else 1) for c in ds.classes}
    profile = profile_from_images(
        images,
        onnx_path,
        labels=np.array([index[r.label] for r in records], dtype=np.int64),
        cameras=[r.camera for r in records],
    )
    profile.split = split
    profile.dataset_version = ds.version
    log.info(
        "reference_built", extra={"parts": len(records), "split": split, "model_name": profile.model_name}
    )
    return profile


def fetch_reference(settings: Settings, model_name: str, model_version: str) -> ReferenceProfile | None:
    """The profile registered with a model version (cached under data_dir), or None if it has none."""
    cache = settings.data_dir / "monitoring" / "references" / model_name / model_version / REFERENCE_FILE
    if cache.is_file():
        return load_reference(cache)
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = settings.resolved_mlflow_uri
    try:
        mv = MlflowClient(uri, uri).get_model_version(model_name, model_version)
    except MlflowException as exc:
        log.warning(
            "reference_lookup_failed",
            extra={"model_name": model_name, "model_version": model_version, "error": str(exc)},
        )
        return None
    artifact = (mv.tags or {}).get(TAG_REFERENCE)
    if not artifact:
        return None
    cache.parent.mkdir(parents=True, exist_ok=True)
    local = Path(download_artifacts(artifact_uri=artifact, dst_path=str(cache.parent), tracking_uri=uri))
    if local != cache:
        local.replace(cache)
    profile = load_reference(cache)
    profile.model_version = model_version
    return profile
