"""Windows of the prediction log, by count and by time, per line, camera and model version.

Count windows hold ``window`` consecutive predictions of one group and are evaluated every
``stride`` new predictions; each evaluated window carries a sequence number ``seq`` along its chain
(stored in the drift result), so a later check continues exactly where the last one stopped.
Every ``window / stride``-th window is a *block*: blocks do not overlap and are the subgroups of the
SPC charts. Time windows are aligned to multiples of ``window_s`` seconds since the epoch, never
overlap, and are all blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kensa.store.models import DriftResult, Prediction


@dataclass(frozen=True)
class Group:
    """The predictions one drift chain follows: a line, a camera, and the model that served them."""

    line_id: str
    camera_id: str | None
    model_name: str
    model_version: str
    # True: one chain for all of the line's cameras (the reference cannot tell cameras apart).
    all_cameras: bool = False

    @property
    def scope(self) -> str:
        return "line" if self.all_cameras else "camera"

    @property
    def label(self) -> str:
        camera = "*" if self.all_cameras else self.camera_id or "-"
        return f"{self.line_id}/{camera} ({self.model_name} v{self.model_version})"


@dataclass
class Window:
    """Consecutive predictions of one group, oldest first."""

    rows: list[Prediction]
    seq: int
    block: bool
    start: datetime
    end: datetime

    @property
    def start_id(self) -> int:
        return self.rows[0].id

    @property
    def end_id(self) -> int:
        return self.rows[-1].id


def _where(group: Group) -> list[Any]:
    clauses = [
        Prediction.line_id == group.line_id,
        Prediction.model_name == group.model_name,
        Prediction.model_version == group.model_version,
    ]
    if not group.all_cameras:
        clauses.append(
            Prediction.camera_id == group.camera_id
            if group.camera_id is not None
            else Prediction.camera_id.is_(None)
        )
    return clauses


def list_groups(session: Session, *, line_id: str | None = None) -> list[Group]:
    """Every (line, camera) in the log, each with the model of its newest prediction."""
    query = select(Prediction.line_id, Prediction.camera_id, func.max(Prediction.id)).group_by(
        Prediction.line_id, Prediction.camera_id
    )
    if line_id is not None:
        query = query.where(Prediction.line_id == line_id)
    groups = []
    for line, camera, newest in session.execute(query).all():
        name, version = session.execute(
            select(Prediction.model_name, Prediction.model_version).where(Prediction.id == newest)
        ).one()
        groups.append(Group(line, camera, name, version))
    return sorted(groups, key=lambda g: (g.line_id, g.camera_id or ""))


def merge_cameras(groups: list[Group], split: Callable[[Group], bool]) -> list[Group]:
    """Per line and model: the camera groups if ``split`` holds for all of them, else one line group."""
    by_line: dict[tuple[str, str, str], list[Group]] = {}
    for g in groups:
        by_line.setdefault((g.line_id, g.model_name, g.model_version), []).append(g)
    out: list[Group] = []
    for (line, name, version), members in by_line.items():
        if all(g.camera_id is not None and split(g) for g in members):
            out += members
        else:
            out.append(Group(line, None, name, version, all_cameras=True))
    return out


def last_result(session: Session, group: Group, mode: str) -> DriftResult | None:
    """The newest drift result of this group's chain in ``mode`` (count or time), if any."""
    query = select(DriftResult).where(DriftResult.line_id == group.line_id)
    query = query.where(
        DriftResult.camera_id == group.camera_id
        if group.camera_id is not None
        else DriftResult.camera_id.is_(None)
    )
    for result in session.scalars(query.order_by(DriftResult.id.desc()).limit(200)):
        d = result.details or {}
        if (
            d.get("mode") == mode
            and d.get("scope", "camera") == group.scope
            and d.get("model_name") == group.model_name
            and d.get("model_version") == group.model_version
        ):
            return result
    return None


def recent_blocks(session: Session, group: Group, mode: str, limit: int = 8) -> list[DriftResult]:
    """The newest SPC subgroups (block windows) of the chain, oldest first."""
    query = select(DriftResult).where(DriftResult.line_id == group.line_id)
    query = query.where(
        DriftResult.camera_id == group.camera_id
        if group.camera_id is not None
        else DriftResult.camera_id.is_(None)
    )
    found: list[DriftResult] = []
    for result in session.scalars(query.order_by(DriftResult.id.desc()).limit(50 * limit)):
        d = result.details or {}
        if (
            d.get("mode") == mode
            and d.get("scope", "camera") == group.scope
            and d.get("model_version") == group.model_version
            and d.get("model_name") == group.model_name
            and d.get("spc") is not None
        ):
            found.append(result)
            if len(found) == limit:
                break
    return found[::-1]


def count_windows(
    session: Session,
    group: Group,
    *,
    window: int,
    stride: int,
    last: DriftResult | None,
    max_windows: int,
) -> tuple[list[Window], int]:
    """New count windows since ``last`` (at most ``max_windows``, newest kept) and parts skipped."""
    reach = window + (max_windows - 1) * stride
    rows = list(
        session.scalars(select(Prediction).where(*_where(group)).order_by(Prediction.id.desc()).limit(reach))
    )[::-1]
    per_block = max(1, math.ceil(window / stride))
    ids = [r.id for r in rows]
    last_id = int((last.details or {}).get("end_id", -1)) if last is not None else None
    last_seq = int((last.details or {}).get("seq", -1)) if last is not None else -1
    skipped = 0
    if last_id is not None and last_id in ids:
        first_end, seq = ids.index(last_id) + stride, last_seq + 1
    else:
        if last_id is not None:
            # More new parts than one check reads: start a fresh chain on the newest ones.
            skipped = sum(1 for i in ids if i > last_id) - len(rows)
        first_end, seq = window - 1, 0
    out = []
    for end in range(first_end, len(rows), stride):
        start = end - window + 1
        if start < 0:
            seq += 1
            continue
        chunk = rows[start : end + 1]
        out.append(Window(chunk, seq, seq % per_block == 0, chunk[0].created_at, chunk[-1].created_at))
        seq += 1
    return out[-max_windows:], max(skipped, 0)


def time_windows(
    session: Session,
    group: Group,
    *,
    seconds: float,
    last: DriftResult | None,
    now: datetime,
    max_windows: int,
    min_rows: int,
) -> list[Window]:
    """Complete time windows since ``last`` with at least ``min_rows`` predictions."""
    step = timedelta(seconds=seconds)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    newest_end = epoch + step * math.floor((now - epoch) / step)
    begin = newest_end - step * max_windows
    if last is not None and last.window_end is not None:
        begin = max(begin, epoch + step * math.ceil((last.window_end - epoch) / step))
    out = []
    start = begin
    while start + step <= newest_end:
        end = start + step
        rows = list(
            session.scalars(
                select(Prediction)
                .where(*_where(group), Prediction.created_at >= start, Prediction.created_at < end)
                .order_by(Prediction.id)
            )
        )
        if len(rows) >= min_rows:
            seq = int((start - epoch) / step)
            out.append(Window(rows, seq, True, start, end))
        start = end
    return out
