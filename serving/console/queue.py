"""The review queue in the store: the next part for a person, its label choices, and the label
itself (recorded once, with who and when, and audited)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from kensa.serving.inference.predlog import ANOMALY_KEY
from kensa.store.audit import append_event
from kensa.store.models import Prediction, ReviewItem, utcnow

# A person who cannot tell: the part is set aside ("skipped"), never used as a training label.
LABEL_UNSURE = "unsure"
KEY_UNSURE = "u"
MAX_KEYED_CLASSES = 9  # keys 1..9


class AlreadyLabelled(ValueError):
    """Someone labelled (or set aside) this part first."""


@dataclass(frozen=True)
class LabelChoice:
    label: str
    key: str | None  # the one key that applies it


@dataclass(frozen=True)
class QueueView:
    """What the review page shows for one part."""

    item: ReviewItem
    probs: list[tuple[str, float]]  # class order of the model, "ok" first
    choices: list[LabelChoice]
    part_id: str | None
    verdict_hint: str  # the class the model leaned to
    next_id: int | None  # the part after this one (its image is prefetched)
    # An anomaly model's finding when it judged the part (score, peak, region: the prediction
    # log's ``image_stats["anomaly"]``); None for a classifier's verdict.
    anomaly: dict[str, Any] | None = None

    @property
    def region_box(self) -> dict[str, int] | None:
        """The region in pixels of the image as sent, if the anomaly model cut one."""
        region = (self.anomaly or {}).get("region")
        box = region.get("image_box") if isinstance(region, dict) else None
        return box if isinstance(box, dict) and {"x0", "y0", "x1", "y1"} <= set(box) else None


def ordered_classes(probs: dict[str, float]) -> list[str]:
    names = list(probs)
    return (["ok"] if "ok" in probs else []) + [n for n in names if n != "ok"]


def label_choices(probs: dict[str, float]) -> list[LabelChoice]:
    classes = ordered_classes(probs)
    keyed = [
        LabelChoice(name, str(i + 1) if i < MAX_KEYED_CLASSES else None) for i, name in enumerate(classes)
    ]
    return [*keyed, LabelChoice(LABEL_UNSURE, KEY_UNSURE)]


def _open_items(line_id: str | None) -> Select[ReviewItem]:
    query = select(ReviewItem).where(ReviewItem.status == "open")
    if line_id:
        query = query.where(ReviewItem.line_id == line_id)
    # Oldest first: the part that has waited longest; id breaks ties made in one batch.
    return query.order_by(ReviewItem.created_at, ReviewItem.id)


def next_view(session: Session, *, line_id: str | None = None) -> QueueView | None:
    """The oldest open part (and the id of the one after it), or None when the queue is empty."""
    items = list(session.scalars(_open_items(line_id).limit(2)))
    if not items:
        return None
    item = items[0]
    probs = dict(item.probs or {})
    ordered = [(name, float(probs[name])) for name in ordered_classes(probs)]
    part_id, anomaly = None, None
    if item.prediction_id is not None:
        found = session.execute(
            select(Prediction.part_id, Prediction.image_stats).where(Prediction.id == item.prediction_id)
        ).first()
        if found is not None:
            part_id = found.part_id
            stored = (found.image_stats or {}).get(ANOMALY_KEY)
            anomaly = stored if isinstance(stored, dict) else None
    return QueueView(
        item=item,
        probs=ordered,
        choices=label_choices(probs),
        part_id=part_id,
        verdict_hint=max(ordered, key=lambda kv: kv[1])[0] if ordered else "",
        next_id=items[1].id if len(items) > 1 else None,
        anomaly=anomaly,
    )


def backlog(session: Session, *, line_id: str | None = None) -> tuple[int, datetime | None]:
    """Open parts waiting for a person, and when the oldest arrived."""
    query = select(func.count(), func.min(ReviewItem.created_at)).where(ReviewItem.status == "open")
    if line_id:
        query = query.where(ReviewItem.line_id == line_id)
    count, oldest = session.execute(query).one()
    return int(count or 0), oldest


def queue_lines(session: Session) -> list[str]:
    query = (
        select(ReviewItem.line_id).where(ReviewItem.status == "open").distinct().order_by(ReviewItem.line_id)
    )
    return [line for line in session.scalars(query) if line]


def recent_labels(session: Session, *, by: str, limit: int = 5) -> list[ReviewItem]:
    query = (
        select(ReviewItem)
        .where(ReviewItem.labelled_by == by)
        .order_by(ReviewItem.labelled_at.desc(), ReviewItem.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def label_item(session: Session, item_id: int, *, label: str, by: str, actor_key_id: int) -> ReviewItem:
    """Record ``label`` for open item ``item_id`` by ``by``; the caller commits.

    Raises LookupError (no such item), ValueError (a label the model does not know) or
    AlreadyLabelled (someone was first: the update only touches an item still open, so two people
    pressing a key on the same part at once cannot both win).
    """
    item = session.get(ReviewItem, item_id)
    if item is None:
        raise LookupError(f"review item {item_id} does not exist")
    allowed = [c.label for c in label_choices(dict(item.probs or {}))]
    if label not in allowed:
        raise ValueError(f"label {label!r} is not one of this model's labels: {', '.join(allowed)}")
    now = utcnow()
    status = "skipped" if label == LABEL_UNSURE else "labelled"
    result = session.execute(
        update(ReviewItem)
        .where(ReviewItem.id == item_id, ReviewItem.status == "open")
        .values(status=status, label=label, labelled_by=by, labelled_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        session.refresh(item)
        raise AlreadyLabelled(
            f"part {item_id} was already {item.status} as {item.label!r} by {item.labelled_by} "
            f"at {item.labelled_at:%H:%M:%S} UTC"
        )
    append_event(
        session,
        actor=by,
        action="review.label",
        subject=f"review:{item_id}",
        details={
            "label": label,
            "status": status,
            "key_id": actor_key_id,
            "model_version": item.model_version,
            "reason": item.reason,
        },
    )
    session.refresh(item)
    return item


def image_file(item: ReviewItem, images_root: Path) -> Path | None:
    """The item's stored image, only if it lies under the image store (a row cannot point at
    an arbitrary file on the server)."""
    if not item.image_path:
        return None
    root = images_root.resolve()
    path = Path(item.image_path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path
