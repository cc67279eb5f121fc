"""The line at a glance, from the prediction log and the review queue: throughput, automation,
defect Pareto, review backlog and an estimated escape rate over a recent window."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Integer, cast, func, select
from sqlalchemy.orm import Session

from kensa.serving.console.queue import LABEL_UNSURE, backlog
from kensa.store.models import Prediction, ReviewItem, utcnow

WINDOWS_MIN: tuple[int, ...] = (15, 60, 480, 1440)
SERIES_BUCKETS = 30
# The escape estimate reads each part's probabilities; the newest parts of the window suffice.
ESCAPE_SAMPLE = 5000


@dataclass(frozen=True)
class ParetoRow:
    defect: str
    machine: int  # verdict "defect" with this type
    human: int  # review-band parts a person labelled with this type
    total: int
    cumulative: float  # share of all defects up to and including this row


@dataclass
class LineStats:
    line_id: str | None
    minutes: int
    since: datetime
    total: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    series: list[int] = field(default_factory=list)  # parts per bucket, oldest first
    bucket_s: int = 60
    pareto: list[ParetoRow] = field(default_factory=list)
    backlog: int = 0
    oldest_open: datetime | None = None
    escape_estimate: float | None = None
    escape_parts: int = 0
    lines: list[str] = field(default_factory=list)

    @property
    def per_minute(self) -> float:
        return self.total / self.minutes if self.minutes else 0.0

    @property
    def automation_rate(self) -> float | None:
        if not self.total:
            return None
        return (self.total - self.verdicts.get("review", 0)) / self.total


def _bucket(session: Session, bucket_s: int) -> ColumnElement[Any]:
    """Seconds since the epoch // bucket_s, in the store's SQL dialect."""
    # Floor division (SQLAlchemy's "/" is true division since 2.0).
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", Prediction.created_at), Integer) // bucket_s
    # SQLite keeps UTC timestamps as text; strftime('%s') reads them as UTC.
    return cast(func.strftime("%s", Prediction.created_at), Integer) // bucket_s


def _where_line(query: Any, column: Any, line_id: str | None) -> Any:
    return query.where(column == line_id) if line_id else query


def line_stats(
    session: Session, *, line_id: str | None, minutes: int, now: datetime | None = None
) -> LineStats:
    """Statistics of the last ``minutes`` (of one line, or all lines)."""
    now = now or utcnow()
    since = now - timedelta(minutes=minutes)
    stats = LineStats(line_id=line_id, minutes=minutes, since=since)
    in_window = Prediction.created_at >= since

    rows = session.execute(
        _where_line(
            select(Prediction.verdict, func.count()).where(in_window).group_by(Prediction.verdict),
            Prediction.line_id,
            line_id,
        )
    ).all()
    stats.verdicts = {verdict: int(n) for verdict, n in rows}
    stats.total = sum(stats.verdicts.values())

    stats.bucket_s = max(60, minutes * 60 // SERIES_BUCKETS)
    bucket = _bucket(session, stats.bucket_s)
    query = select(bucket, func.count()).where(in_window).group_by(bucket)
    counts = {int(key): int(n) for key, n in session.execute(_where_line(query, Prediction.line_id, line_id))}
    last = int(now.timestamp()) // stats.bucket_s
    n_buckets = max(1, minutes * 60 // stats.bucket_s)
    stats.series = [counts.get(b, 0) for b in range(last - n_buckets + 1, last + 1)]

    stats.pareto = _pareto(session, line_id, since)
    stats.backlog, stats.oldest_open = backlog(session, line_id=line_id)
    stats.escape_estimate, stats.escape_parts = _escape_estimate(session, line_id, since)
    stats.lines = [
        line
        for line in session.scalars(
            select(Prediction.line_id).where(in_window).distinct().order_by(Prediction.line_id)
        )
        if line
    ]
    return stats


def _pareto(session: Session, line_id: str | None, since: datetime) -> list[ParetoRow]:
    machine = dict(
        session.execute(
            _where_line(
                select(Prediction.defect_type, func.count())
                .where(Prediction.created_at >= since, Prediction.verdict == "defect")
                .group_by(Prediction.defect_type),
                Prediction.line_id,
                line_id,
            )
        ).all()
    )
    human = dict(
        session.execute(
            _where_line(
                select(ReviewItem.label, func.count())
                .where(
                    ReviewItem.labelled_at >= since,
                    ReviewItem.status == "labelled",
                    ReviewItem.label.is_not(None),
                    ReviewItem.label.not_in(("ok", LABEL_UNSURE)),
                )
                .group_by(ReviewItem.label),
                ReviewItem.line_id,
                line_id,
            )
        ).all()
    )
    names = {str(k or "unknown") for k in machine} | {str(k) for k in human}
    totals = {name: (int(machine.get(name, 0) or 0), int(human.get(name, 0) or 0)) for name in names}
    if None in machine:
        m, h = totals["unknown"]
        totals["unknown"] = (m + int(machine[None]), h)
    grand = sum(m + h for m, h in totals.values())
    rows: list[ParetoRow] = []
    running = 0
    for name, (m, h) in sorted(totals.items(), key=lambda kv: (-(kv[1][0] + kv[1][1]), kv[0])):
        running += m + h
        rows.append(ParetoRow(name, m, h, m + h, running / grand if grand else 0.0))
    return rows


def _escape_estimate(session: Session, line_id: str | None, since: datetime) -> tuple[float | None, int]:
    """Expected escapes / expected defective parts, from the model's calibrated probabilities.

    A part judged ok still has probability 1 − p(ok) of being defective; summed over the parts
    passed as ok that is the expected number of escapes, and summed over all parts the expected
    number of defective ones. It is the model's own estimate (as good as its calibration), shown
    next to the bound the thresholds guarantee.
    """
    query = _where_line(
        select(Prediction.verdict, Prediction.probs)
        .where(Prediction.created_at >= since)
        .order_by(Prediction.id.desc())
        .limit(ESCAPE_SAMPLE),
        Prediction.line_id,
        line_id,
    )
    escapes = defective = 0.0
    n = 0
    for verdict, probs in session.execute(query):
        p_defect = 1.0 - float((probs or {}).get("ok", 1.0))
        defective += p_defect
        if verdict == "ok":
            escapes += p_defect
        n += 1
    if defective <= 0:
        return None, n
    return escapes / defective, n
