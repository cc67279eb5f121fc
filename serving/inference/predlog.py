"""The prediction log: every verdict's row committed before its answer leaves, one commit per batch.

Also keeps images content-addressed (``images_dir/<sha[:2]>/<sha>.<ext>``) for the review queue
and for retraining: every review-band image, and a ``sample_rate`` share of the others, chosen by
hash so the same image is always either kept or not.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kensa.serving.errors import ApiError
from kensa.serving.inference.anomaly import Finding, HeatSource
from kensa.store.models import Prediction, ReviewItem, utcnow

log = logging.getLogger("kensa.serving.predlog")

# An anomaly model's finding rides in the row's ``image_stats`` JSON under this key, so a replayed
# answer keeps its region (drift reads only its own named statistics there). The map is not kept.
ANOMALY_KEY = "anomaly"


@dataclass(frozen=True)
class Answer:
    """A verdict as the caller sees it; rebuilt from the row when a retry is replayed."""

    request_id: str
    verdict: str
    defect_type: str | None
    probs: dict[str, float]
    features: list[float]
    model_name: str
    model_version: str
    latency_ms: float
    part_id: str
    image_sha256: str
    replayed: bool = False
    anomaly: Finding | None = None  # anomaly models only: score, peak and region
    # The map and input to draw a heatmap from, only where the request asked for it; never stored.
    heat: HeatSource | None = field(default=None, compare=False, repr=False)


@dataclass
class PendingRow:
    """Everything one prediction row needs, produced by the finishing stage of a batch."""

    answer: Answer
    idempotency_key: str | None
    line_id: str
    camera_id: str | None
    image_stats: dict[str, float]
    image_ext: str
    # The bytes to keep if this image is stored (encoded upload, or a PNG of a v2 tensor).
    image_bytes: Callable[[], bytes]


def is_sampled(sha256: str, rate: float) -> bool:
    """Deterministic sample by hash: the same image is always kept or always not."""
    return int(sha256[:8], 16) < rate * 0x1_0000_0000


class ImageStore:
    """Content-addressed files: writing the same image twice is a no-op."""

    def __init__(self, root: Path) -> None:
        # Resolved once: resolving each stored image's path (a readlink per component) took a
        # fifth of the database thread's time under load.
        self.root = root.resolve()

    def put(self, sha256: str, ext: str, data: Callable[[], bytes]) -> str:
        path = self.root / sha256[:2] / f"{sha256}.{ext}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a crash never leaves a half image under its final name.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return str(path)


def answer_from_row(row: Prediction, replayed: bool) -> Answer:
    stored = (row.image_stats or {}).get(ANOMALY_KEY)
    return Answer(
        request_id=row.request_id,
        verdict=row.verdict,
        defect_type=row.defect_type,
        probs=dict(row.probs),
        features=list(row.features or []),
        model_name=row.model_name,
        model_version=row.model_version,
        latency_ms=row.latency_ms,
        part_id=row.part_id,
        image_sha256=row.image_sha256,
        replayed=replayed,
        anomaly=Finding.from_dict(stored) if isinstance(stored, dict) else None,
    )


def key_conflict(key: str) -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        f"Idempotency-Key {key[:64]!r} was already used for a different image; use a new key for a new part",
    )


class PredictionLog:
    """Writes prediction rows (and review items) in one transaction per micro-batch."""

    def __init__(self, sessions: sessionmaker[Session], images: ImageStore, sample_rate: float) -> None:
        self._sessions = sessions
        self._images = images
        self._sample_rate = sample_rate

    @property
    def writers(self) -> int:
        """Threads worth writing at once: SQLite takes one writer at a time, and a second one
        waits in its busy handler (measured under load: 8 ms per batch's insert instead of 4)."""
        bind = self._sessions.kw.get("bind")
        return 1 if bind is None or bind.dialect.name == "sqlite" else 2

    def find(self, key: str) -> Answer | None:
        """The stored answer for an idempotency key, if any."""
        with self._sessions() as session:
            row = session.scalar(select(Prediction).where(Prediction.idempotency_key == key))
            return answer_from_row(row, replayed=True) if row is not None else None

    def _values(self, pending: PendingRow) -> tuple[dict[str, Any], str | None]:
        a = pending.answer
        keep = a.verdict == "review" or is_sampled(a.image_sha256, self._sample_rate)
        path = self._images.put(a.image_sha256, pending.image_ext, pending.image_bytes) if keep else None
        values = dict(
            request_id=a.request_id,
            idempotency_key=pending.idempotency_key,
            image_sha256=a.image_sha256,
            model_name=a.model_name,
            model_version=a.model_version,
            verdict=a.verdict,
            defect_type=a.defect_type,
            probs=a.probs,
            features=a.features,
            image_stats=(
                {**pending.image_stats, ANOMALY_KEY: a.anomaly.to_dict()}
                if a.anomaly is not None
                else pending.image_stats
            ),
            latency_ms=a.latency_ms,
            part_id=a.part_id,
            line_id=pending.line_id,
            camera_id=pending.camera_id,
            image_path=path,
            created_at=utcnow(),
        )
        return values, path

    def _insert(self, session: Session, rows: list[PendingRow]) -> None:
        """Bulk INSERT the prediction rows, then the review items of those in the review band.

        Two statements per batch: the ORM's unit of work (one flush per review row, for its id)
        cost about as much CPU as decoding the image, profiled under load on SQLite.
        """
        made = [self._values(p) for p in rows]
        ids = session.scalars(
            insert(Prediction).returning(Prediction.id, sort_by_parameter_order=True),
            [values for values, _ in made],
        ).all()
        reviews = [
            dict(
                prediction_id=row_id,
                image_path=path or "",
                reason="review_band",
                model_name=values["model_name"],
                model_version=values["model_version"],
                probs=values["probs"],
                line_id=values["line_id"],
                camera_id=values["camera_id"],
                created_at=utcnow(),
            )
            for row_id, (values, path) in zip(ids, made, strict=True)
            if values["verdict"] == "review"
        ]
        if reviews:
            session.execute(insert(ReviewItem), reviews)

    def write(self, rows: list[PendingRow]) -> list[Answer | ApiError]:
        """Commit ``rows`` (one transaction); per row, the answer to send or the error to raise.

        A unique-key clash (the same Idempotency-Key committed meanwhile by another process)
        sends the batch down a row-by-row path, where the clashing row becomes a replay.
        """
        try:
            with self._sessions() as session:
                self._insert(session, rows)
                session.commit()
            return [p.answer for p in rows]
        except IntegrityError:
            log.info("group_commit_conflict", extra={"rows": len(rows), "fallback": "row_by_row"})
        return [self._write_one(p) for p in rows]

    def _write_one(self, pending: PendingRow) -> Answer | ApiError:
        try:
            with self._sessions() as session:
                self._insert(session, [pending])
                session.commit()
            return pending.answer
        except IntegrityError:
            key = pending.idempotency_key
            stored = self.find(key) if key else None
            if stored is None:
                raise
            if stored.image_sha256 != pending.answer.image_sha256:
                return key_conflict(key or "")
            return stored


def describe(answer: Answer) -> dict[str, Any]:
    """The v1 response body of one answer; ``anomaly`` only for an anomaly model's answer, so a
    classifier's body is what it always was."""
    body: dict[str, Any] = {
        "request_id": answer.request_id,
        "part_id": answer.part_id,
        "verdict": answer.verdict,
        "defect_type": answer.defect_type,
        "probs": answer.probs,
        "model_name": answer.model_name,
        "model_version": answer.model_version,
        "latency_ms": answer.latency_ms,
        "replayed": answer.replayed,
    }
    if answer.anomaly is not None:
        body["anomaly"] = answer.anomaly.to_dict()
    return body
