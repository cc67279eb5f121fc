"""The drift job: new windows of the prediction log scored against the model's reference.

Per line and camera (and the model version that served them) it reads the windows completed since
the last check, scores each with the budget-calibrated policy (``policy.py``), records Evidently's
default verdicts beside it (``report.py``), estimates the window's escape and false-reject rates
without labels (``estimate.py``), updates the SPC charts (``spc.py``) and stores a ``DriftResult``
per window. The worst window of a check opens (or updates) an alert, with an Evidently HTML report;
a critical drift alert also queues a sample of that window's stored images for review.
The caller (the ``drift-check`` flow, a test) decides what a critical alert sets off next.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kensa.monitoring.alerts import SYSTEM_ACTOR, find_active, open_alert, resolve
from kensa.monitoring.estimate import Calibrator, estimate_window
from kensa.monitoring.features import SCALAR_COLUMNS, FeatureTable, table_from_rows
from kensa.monitoring.policy import DriftPolicy, WindowScore
from kensa.monitoring.policy_store import PolicyStore
from kensa.monitoring.reference import ReferenceProfile, fetch_reference
from kensa.monitoring.report import column_scores, embedding_drift, write_report
from kensa.monitoring.spc_check import check_spc
from kensa.monitoring.windows import (
    Group,
    Window,
    count_windows,
    last_result,
    list_groups,
    merge_cameras,
    time_windows,
)
from kensa.settings import Settings
from kensa.store.models import DriftResult, ReviewItem, utcnow

log = logging.getLogger("kensa.monitoring.drift")

ReferenceLookup = Callable[[str, str], ReferenceProfile | None]
_RANK = {"none": 0, "warning": 1, "critical": 2}
_SCORE = SCALAR_COLUMNS.index("defect_score")


@dataclass(frozen=True)
class CheckOptions:
    """How one drift check reads the log (defaults from Settings)."""

    mode: str = "count"  # count | time
    window: int = 200
    stride: int = 50
    window_s: float = 3600.0
    line_id: str | None = None
    max_windows: int = 100
    min_rows: int = 30
    review_sample: int = 20
    reports: bool = True
    seed: int = 0
    n_boot: int = 10_000  # bootstrap windows per policy calibration

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> CheckOptions:
        window = int(overrides.pop("window", None) or settings.drift_window)
        base = cls(window=window, stride=max(1, window // 4), window_s=settings.drift_window_s)
        opts = cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})
        if opts.mode not in ("count", "time"):
            raise ValueError(f"window mode {opts.mode!r} is not one of: count, time")
        if opts.window < 20:
            raise ValueError(f"a drift window needs at least 20 parts; got {opts.window}")
        return opts


@dataclass
class GroupReport:
    """What one check saw on one line/camera."""

    group: str
    windows: int = 0
    levels: dict[str, int] = field(default_factory=dict)
    last: dict[str, Any] | None = None
    skipped: str | None = None


@dataclass
class CheckOutcome:
    """What one drift check did."""

    groups: list[GroupReport] = field(default_factory=list)
    results: list[int] = field(default_factory=list)
    alerts: list[int] = field(default_factory=list)
    critical_drift: list[int] = field(default_factory=list)
    review_items: int = 0
    reports: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Scored:
    window: Window
    table: FeatureTable
    score: WindowScore
    result: DriftResult


def check_drift(
    sessions: sessionmaker[Session],
    settings: Settings,
    options: CheckOptions,
    *,
    references: ReferenceLookup | None = None,
    now: datetime | None = None,
) -> CheckOutcome:
    """Score every new window of every line/camera; store results, alerts and review samples."""
    base = references or (lambda name, version: fetch_reference(settings, name, version))
    found: dict[tuple[str, str], ReferenceProfile | None] = {}

    def lookup(name: str, version: str) -> ReferenceProfile | None:
        if (name, version) not in found:
            found[(name, version)] = base(name, version)
        return found[(name, version)]

    store = PolicyStore(settings, seed=options.seed, n_boot=options.n_boot)
    outcome = CheckOutcome()
    with sessions() as session:
        groups = list_groups(session, line_id=options.line_id)

    def own_camera_reference(g: Group) -> bool:
        # A camera is watched on its own only when the reference has enough of its parts;
        # otherwise the line's cameras share one chain against the whole reference.
        reference = lookup(g.model_name, g.model_version)
        return reference is not None and reference.for_camera(g.camera_id)[1] is not None

    for group in merge_cameras(groups, own_camera_reference):
        report = GroupReport(group.label)
        outcome.groups.append(report)
        reference = lookup(group.model_name, group.model_version)
        if reference is None:
            report.skipped = f"model {group.model_name} v{group.model_version} has no reference profile"
            log.warning("drift_skipped", extra={"group": group.label, "reason": "no_reference"})
            continue
        with sessions() as session:
            _check_group(session, settings, options, group, reference, store, report, outcome, now)
            session.commit()
    return outcome


def _check_group(
    session: Session,
    settings: Settings,
    options: CheckOptions,
    group: Group,
    reference: ReferenceProfile,
    store: PolicyStore,
    report: GroupReport,
    outcome: CheckOutcome,
    now: datetime | None,
) -> None:
    ref_table, ref_camera = reference.for_camera(None if group.all_cameras else group.camera_id)
    policy = store.policy(reference, ref_camera, window=options.window, stride=options.stride)
    last = last_result(session, group, options.mode)
    if options.mode == "count":
        windows, skipped = count_windows(
            session,
            group,
            window=options.window,
            stride=options.stride,
            last=last,
            max_windows=options.max_windows,
        )
        if skipped:
            log.warning("drift_backlog", extra={"group": group.label, "skipped_parts": skipped})
    else:
        windows = time_windows(
            session,
            group,
            seconds=options.window_s,
            last=last,
            now=now or utcnow(),
            max_windows=options.max_windows,
            min_rows=options.min_rows,
        )
    calibrator = reference.calibrator() if reference.table.labels is not None else None
    scored = [
        _score_window(session, options, group, reference, ref_table, policy, calibrator, w) for w in windows
    ]
    session.flush()
    report.windows = len(scored)
    report.levels = dict(Counter(s.score.level for s in scored))
    outcome.results += [s.result.id for s in scored]
    if not scored:
        return
    newest = scored[-1]
    newest.result.details = {
        **newest.result.details,
        "evidently_embeddings": embedding_drift(ref_table, newest.table),
    }
    report.last = {
        "score": newest.score.score,
        "level": newest.score.level,
        **newest.result.details["estimate"],
    }
    worst = max(scored, key=lambda s: (_RANK[s.score.level], s.score.score))
    if worst.score.level != "none":
        _raise_drift(session, settings, options, group, ref_table, worst, outcome)
    new_blocks = sum(s.window.block for s in scored)
    outcome.alerts += check_spc(session, store, reference, ref_camera, options.mode, group, new_blocks)


def _score_window(
    session: Session,
    options: CheckOptions,
    group: Group,
    reference: ReferenceProfile,
    ref_table: FeatureTable,
    policy: DriftPolicy,
    calibrator: Calibrator | None,
    window: Window,
) -> _Scored:
    table = table_from_rows(window.rows, reference.classes)
    parts = len(window.rows) if options.mode == "time" else None
    score = policy.score(table, parts=parts)
    details: dict[str, Any] = {
        "mode": options.mode,
        "scope": group.scope,
        "model_name": group.model_name,
        "model_version": group.model_version,
        "start_id": window.start_id,
        "end_id": window.end_id,
        "seq": window.seq,
        "policy": {**score.to_dict(), **policy.describe()},
    }
    if calibrator is not None:
        details["estimate"] = estimate_window(
            table.scalars[:, _SCORE], calibrator, drift_level=score.level, **reference.thresholds
        ).to_dict()
    else:
        details["estimate"] = {"reliable": False, "reason": "the reference has no labels"}
    columns = column_scores(ref_table, table)
    share = sum(c["drifted"] for c in columns) / len(columns)
    # Evidently's own verdicts at its defaults, kept beside kensa's for comparison (its embedding
    # check costs seconds with its bootstrap, so only the windows people look at get it).
    details["evidently"] = {
        "drift_share": share,
        "dataset_drift": share >= 0.5,
        "drifted_columns": [c["column"] for c in columns if c["drifted"]],
        "columns": {c["column"]: round(c["score"], 5) for c in columns},
        "method": columns[0]["method"],
    }
    if window.block:
        verdicts = [r.verdict for r in window.rows]
        details["spc"] = {
            "n": len(verdicts),
            "defect": verdicts.count("defect"),
            "review": verdicts.count("review"),
        }
    result = DriftResult(
        line_id=group.line_id,
        camera_id=group.camera_id,
        window_size=len(window.rows),
        window_start=window.start,
        window_end=window.end,
        score=score.score,
        level=score.level,
        details=details,
        created_at=utcnow(),
    )
    session.add(result)
    return _Scored(window, table, score, result)


def _safe(text: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text or "-")[:64]


def _raise_drift(
    session: Session,
    settings: Settings,
    options: CheckOptions,
    group: Group,
    ref_table: FeatureTable,
    worst: _Scored,
    outcome: CheckOutcome,
) -> None:
    level, score = worst.score.level, worst.score
    active = find_active(
        session, kind="drift", line_id=group.line_id, camera_id=group.camera_id, cause_key="drift"
    )
    if active is not None and _RANK[active.level] >= _RANK[level]:
        seen = int((active.details or {}).get("windows_seen", 1)) + 1
        active.details = {**active.details, "windows_seen": seen, "last_drift_result": worst.result.id}
        return
    report_uri = None
    if options.reports:
        camera = "all" if group.all_cameras else _safe(group.camera_id)
        name = f"drift-{_safe(group.line_id)}-{camera}-{worst.window.end_id}.html"
        path = write_report(ref_table, worst.table, settings.artifacts_dir / "monitoring" / "reports" / name)
        report_uri = str(path.resolve())
        worst.result.report_uri = report_uri
        outcome.reports.append(report_uri)
    moved = ", ".join(f"{c.name} {c.z:+.1f}σ" for c in score.top(3))
    cause = (
        f"{level} drift on line {group.line_id}"
        + (f" camera {group.camera_id}" if group.camera_id else "")
        + f": {moved} (score {score.score:.1f}; warning at {score.warning:.1f},"
        + f" critical at {score.critical:.1f})"
    )
    alert = open_alert(
        session,
        level=level,
        kind="drift",
        cause=cause,
        line_id=group.line_id,
        camera_id=group.camera_id,
        window_start=worst.window.start,
        window_end=worst.window.end,
        window_size=len(worst.window.rows),
        top_features=[{"name": c.name, "z": round(c.z, 3)} for c in score.top(5)],
        report_uri=report_uri,
        details={
            "key": "drift",
            "drift_result": worst.result.id,
            "model_name": group.model_name,
            "model_version": group.model_version,
            "score": round(score.score, 4),
            "estimate": worst.result.details.get("estimate"),
            "evidently": worst.result.details.get("evidently"),
            "windows_seen": 1,
        },
    )
    outcome.alerts.append(alert.id)
    if active is not None:  # a warning superseded by a critical alert on the same cause
        resolve(session, active.id, by=SYSTEM_ACTOR, comment=f"superseded by critical alert {alert.id}")
    if level == "critical":
        outcome.critical_drift.append(alert.id)
        outcome.review_items += _queue_for_review(session, worst.window, alert.id, options, alert.details)
    log.info(
        "drift_alert",
        extra={
            "alert_id": alert.id,
            "alert_level": level,
            "group": group.label,
            "score": round(score.score, 4),
        },
    )


def _queue_for_review(
    session: Session, window: Window, alert_id: int, options: CheckOptions, details: dict[str, Any]
) -> int:
    """Put up to ``review_sample`` of the window's stored images in the review queue (reason drift)."""
    queued = set(
        session.scalars(
            select(ReviewItem.prediction_id).where(ReviewItem.prediction_id.in_([r.id for r in window.rows]))
        )
    )
    stored = [r for r in window.rows if r.image_path and r.id not in queued]
    rng = np.random.default_rng([options.seed, alert_id])
    pick = (
        sorted(rng.choice(len(stored), min(options.review_sample, len(stored)), replace=False))
        if stored
        else []
    )
    for i in pick:
        row = stored[int(i)]
        session.add(
            ReviewItem(
                prediction_id=row.id,
                image_path=row.image_path or "",
                reason="drift",
                model_name=row.model_name,
                model_version=row.model_version,
                probs=row.probs,
                line_id=row.line_id,
                camera_id=row.camera_id,
                alert_id=alert_id,
                created_at=utcnow(),
            )
        )
    if not pick:
        details["review_note"] = "no stored images in the window; raise KENSA_SAMPLE_RATE to keep more"
    return len(pick)
