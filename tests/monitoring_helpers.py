"""Synthetic prediction streams for the monitoring tests: features a served model would log.

A part is ok or defective (``defect_rate``); its image statistics jitter around a line's
nominal values, its defect score is calibrated-ish (defectives score high), and its 8-dimensional
embedding separates ok from defective parts. Shifts move one of these, as a lamp, a lens or a
new defect would.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from kensa.monitoring.features import FeatureTable, build_table
from kensa.monitoring.reference import ReferenceProfile
from kensa.store.models import Prediction, utcnow

CLASSES = ("ok", "defect_a", "defect_b")
THRESHOLDS = {"t_ok": 0.2, "t_defect": 0.8}
MODEL = ("qc-test", "1")


@dataclass
class Parts:
    stats: list[dict[str, float]]
    probs: np.ndarray
    embedding: np.ndarray
    labels: np.ndarray

    def table(self) -> FeatureTable:
        return build_table(self.stats, self.probs, self.embedding, CLASSES, labels=self.labels)


def make_parts(
    rng: np.random.Generator,
    n: int,
    *,
    defect_rate: float = 0.2,
    shift: Mapping[str, float] | None = None,
    embedding_shift: float = 0.0,
    score_blur: float = 0.0,
) -> Parts:
    """``n`` parts; ``shift`` adds to image stats (``sharpness`` multiplies), ``score_blur`` pulls
    defective parts' scores towards ok (a defect the camera no longer shows clearly)."""
    shift = dict(shift or {})
    labels = np.where(rng.random(n) < defect_rate, rng.integers(1, 3, n), 0)
    base = {"brightness": 120.0, "contrast": 30.0, "rg_ratio": 1.0, "bg_ratio": 0.95}
    noise = {"brightness": 4.0, "contrast": 2.0, "rg_ratio": 0.02, "bg_ratio": 0.02}
    stats = []
    for _ in range(n):
        row = {k: base[k] + shift.get(k, 0.0) + rng.normal(0, noise[k]) for k in base}
        row["sharpness"] = float(np.exp(rng.normal(5.0, 0.3))) * shift.get("sharpness", 1.0)
        stats.append(row)
    defective = labels > 0
    p_def = np.where(defective, rng.beta(8, 2, n), rng.beta(1, 12, n))
    p_def = np.where(defective, p_def * (1 - score_blur) + score_blur * rng.beta(1, 12, n), p_def)
    split = rng.random(n)
    probs = np.stack([1 - p_def, p_def * split, p_def * (1 - split)], axis=1)
    emb = rng.normal(size=(n, 8)) + defective[:, None] * 1.0 + embedding_shift
    return Parts(stats, probs, emb, labels)


def reference(rng: np.random.Generator, n: int = 600) -> ReferenceProfile:
    return ReferenceProfile(make_parts(rng, n).table(), MODEL[0], dict(THRESHOLDS), model_version=MODEL[1])


def verdict(p_ok: float) -> str:
    s = 1.0 - p_ok
    return "ok" if s <= THRESHOLDS["t_ok"] else "defect" if s >= THRESHOLDS["t_defect"] else "review"


def log_parts(
    sessions: sessionmaker[Session],
    parts: Parts,
    *,
    line: str = "L1",
    camera: str | None = "C1",
    image_dir: Path | None = None,
    keep_every: int = 5,
) -> list[int]:
    """Write the parts to the prediction log as serving would; every ``keep_every``-th image stored."""
    ids = []
    with sessions() as session:
        rows: list[Any] = []
        for i in range(len(parts.labels)):
            path = None
            if image_dir is not None and i % keep_every == 0:
                image_dir.mkdir(parents=True, exist_ok=True)
                path = image_dir / f"{uuid.uuid4().hex}.png"
                path.write_bytes(b"\x89PNG\r\n\x1a\n")  # the queue needs a file, not a picture
            rows.append(
                Prediction(
                    request_id=uuid.uuid4().hex,
                    image_sha256=uuid.uuid4().hex * 2,
                    model_name=MODEL[0],
                    model_version=MODEL[1],
                    verdict=verdict(float(parts.probs[i, 0])),
                    defect_type=None,
                    probs=dict(zip(CLASSES, parts.probs[i].tolist(), strict=True)),
                    features=parts.embedding[i].tolist(),
                    image_stats=parts.stats[i],
                    latency_ms=1.0,
                    part_id=f"{line}-{i}",
                    line_id=line,
                    camera_id=camera,
                    image_path=str(path) if path else None,
                    created_at=utcnow(),
                )
            )
        session.add_all(rows)
        session.commit()
        ids = [r.id for r in rows]
    return ids
