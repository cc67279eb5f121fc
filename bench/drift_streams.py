"""Streams for the drift benchmark: a small model trained on the synthetic line, and its features.

Everything is cached under ``.kensa/bench/drift/``: the dataset, the trained and exported model,
the reference profile (the calibration split) and the rendered streams' features (one ``.npz`` per
stream), so a second run of ``bench.drift`` only re-evaluates.

The model never sees cracks: the line it is trained on makes four defect types, so the "new defect
type" shift (cracks appearing) is genuinely new to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kensa.monitoring.features import FeatureTable, build_table, image_stats
from kensa.monitoring.reference import ReferenceProfile, build_reference, load_reference
from kensa.settings import DEFAULT_CLASSES, Settings

ROOT = Path(".kensa/bench/drift")
IMAGE_SIZE = 64
DEFECT_RATE = 0.15
TRAIN_PARTS = 3000
KNOWN_DEFECTS = ("scratch", "dent", "stain", "missing_hole")
CLASSES = tuple(c for c in DEFAULT_CLASSES if c != "defect_crack")
BASE = {"defect_rate": DEFECT_RATE, "defect_mix": ",".join(f"{d}:1" for d in KNOWN_DEFECTS)}

# Shift name -> (condition overrides at the milder severity, at the stronger severity).
SHIFTS: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "lighting drop": ({"lighting": 0.85}, {"lighting": 0.7}),
    "colour temperature": ({"color_temp": 4500.0}, {"color_temp": 3500.0}),
    "blur": ({"focus_blur": 1.0}, {"focus_blur": 1.5}),
    "noise": ({"noise": 5.0}, {"noise": 10.0}),
    "camera shift": ({"shift": 4.0}, {"shift": 8.0}),
    "new defect type": (
        {"defect_mix": "scratch:1,dent:1,stain:1,missing_hole:1,crack:4"},
        {"defect_mix": "crack:1"},
    ),
    "class mix": ({"defect_rate": 2 * DEFECT_RATE}, {"defect_rate": 3 * DEFECT_RATE}),
}

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class Stream:
    """Rendered parts of one stream: their drift features and true labels."""

    table: FeatureTable
    labels: np.ndarray


def bench_settings() -> Settings:
    return Settings(data_dir=ROOT / "kensa", classes=CLASSES, min_images_per_class=5)


def prepare_model(progress: Progress | None = None) -> tuple[Path, ReferenceProfile]:
    """Dataset → trained small model → ONNX → reference profile (each step cached)."""
    from kensa.models.data.ingest import ingest_dataset
    from kensa.models.evaluation.evaluate_run import evaluate_run
    from kensa.models.line.synthetic import LineConditions, generate_dataset
    from kensa.models.onnx.export import export_run
    from kensa.models.train.trainer import TrainConfig, train

    settings = bench_settings()
    data = ROOT / "line"
    run = ROOT / "run"
    onnx_path = ROOT / "model.onnx"
    ref_path = ROOT / "reference.npz"
    if not (data / ".kensa-dataset.json").is_file():
        if progress:
            progress("render training line", 0, TRAIN_PARTS)
        conditions = LineConditions().with_overrides(BASE)
        generate_dataset(data, n=TRAIN_PARTS, seed=11, image_size=IMAGE_SIZE, conditions=conditions)
        ingest_dataset(data, settings)
    if not (run / "band.json").is_file():
        if progress:
            progress("train small_cnn", 0, 1)
        train(data, TrainConfig(model="small_cnn", epochs=8, seed=0), run, show_progress=False)
        evaluate_run(run, show_progress=False)
    if not onnx_path.is_file():
        export_run(run, onnx_path)
    if not ref_path.is_file():
        build_reference(onnx_path, data).save(ref_path)
    return onnx_path, load_reference(ref_path)


def _key(conditions: dict[str, object], seed: int, n: int) -> str:
    text = json.dumps({"c": conditions, "seed": seed, "n": n, "size": IMAGE_SIZE}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render_stream(
    onnx_path: Path,
    overrides: dict[str, object],
    *,
    seed: int,
    n: int,
    progress: Progress | None = None,
    label: str = "",
) -> Stream:
    """Features of ``n`` parts of the line under ``overrides`` (cached by conditions and seed)."""
    import onnxruntime as ort

    from kensa.models.line.synthetic import LineConditions, iter_parts

    conditions = {**BASE, **overrides}
    cache = ROOT / "streams" / f"{_key(conditions, seed, n)}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            table = FeatureTable(z["scalars"], z["embedding"], z["probs"], CLASSES, list(z["cameras"]))
            return Stream(table, z["labels"])
    line = LineConditions().with_overrides(conditions)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    all_classes = list(DEFAULT_CLASSES)
    stats, probs, feats, labels, cameras = [], [], [], [], []
    batch: list[np.ndarray] = []

    def flush() -> None:
        p, f = sess.run(["probs", "features"], {"images": np.stack(batch)})
        probs.append(p)
        feats.append(f)
        batch.clear()

    for k, (image, record) in enumerate(iter_parts(n, seed, line, IMAGE_SIZE)):
        stats.append(image_stats(image))
        labels.append(all_classes.index(record.label))
        cameras.append(record.camera)
        batch.append(image)
        if len(batch) == 128:
            flush()
            if progress:
                progress(label, k + 1, n)
    if batch:
        flush()
    table = build_table(stats, np.concatenate(probs), np.concatenate(feats), CLASSES, cameras=cameras)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        cache,
        scalars=table.scalars,
        embedding=table.embedding,
        probs=table.probs,
        cameras=np.array(cameras),
        labels=np.array(labels),
    )
    return Stream(table, np.array(labels))
