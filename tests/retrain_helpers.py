"""Helpers for the retraining tests: a champion in the MLflow registry and a labelled review queue.

The champion is registered the way the sweep registers one (ONNX logged in a run that recorded its
dataset as an MLflow dataset input) and approved by a person; the review queue holds images stored
content-addressed under ``images_dir`` with rows as serving writes them, then labelled as an
operator would in the console.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow

from kensa.models.line.stream import StreamPart
from kensa.settings import Settings
from kensa.store.connect import open_store
from kensa.store.models import Prediction, ReviewItem, utcnow


def register_champion(settings: Settings, onnx_path: Path, data_root: Path, name: str) -> str:
    """Register ``onnx_path`` (trained on ``data_root``) and approve it; its version."""
    from kensa.flows.register import approve, register_candidate
    from kensa.flows.tracking import configure_mlflow, ensure_experiment, log_dataset_input
    from kensa.governance.approvals import Approval
    from kensa.models.data.ingest import load_dataset

    configure_mlflow(settings)
    ds = load_dataset(data_root)
    experiment = ensure_experiment(settings, "kensa")
    with mlflow.start_run(
        experiment_id=experiment, run_name="sweep", tags={"kensa.dataset_version": ds.version}
    ):
        log_dataset_input(data_root, ds.version, name=f"line-{ds.short_version}")
        registered = register_candidate(
            onnx_path,
            name,
            registered_by="dana",
            source="sweep",
            kpi={"passed": True},
            cost={},
            parity={},
            settings=settings,
        )
    approve(
        name,
        registered.version,
        by="erin",
        role="operator",
        reason="pilot met the KPI",
        policy=Approval(),
        settings=settings,
    )
    return registered.version


@dataclass(frozen=True)
class Queued:
    review_id: int
    sha256: str
    label: str | None


def queue_reviews(
    settings: Settings,
    parts: Sequence[StreamPart],
    labels: Sequence[str | None],
    *,
    model: tuple[str, str] = ("qc", "1"),
    status: str = "labelled",
    line: str = "L1",
) -> list[Queued]:
    """Store the parts' images and put them in the review queue, labelled ``labels``.

    A label of ``None`` leaves the item open (not labelled yet).
    """
    out = []
    with open_store(settings)() as session:
        for part, label in zip(parts, labels, strict=True):
            sha = hashlib.sha256(part.png).hexdigest()
            path = settings.images_dir / sha[:2] / f"{sha}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(part.png)
            probs = {"ok": 0.5, "defect_scratch": 0.5}
            pred = Prediction(
                request_id=uuid.uuid4().hex,
                image_sha256=sha,
                model_name=model[0],
                model_version=model[1],
                verdict="review",
                probs=probs,
                latency_ms=5.0,
                part_id=part.part_id,
                line_id=line,
                camera_id=part.camera,
                image_path=str(path),
                created_at=utcnow(),
            )
            session.add(pred)
            session.flush()
            item = ReviewItem(
                prediction_id=pred.id,
                image_path=str(path),
                reason="review_band",
                status=status if label is not None else "open",
                label=label,
                labelled_by="omar" if label is not None else None,
                labelled_at=utcnow() if label is not None else None,
                model_name=model[0],
                model_version=model[1],
                probs=probs,
                line_id=line,
                camera_id=part.camera,
                created_at=utcnow(),
            )
            session.add(item)
            session.flush()
            out.append(Queued(item.id, sha, label))
        session.commit()
    return out
