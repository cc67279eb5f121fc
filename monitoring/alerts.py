"""Alert lifecycle: open → acknowledged → resolved, or escalated; every change is audited.

States and the moves allowed between them::

    open ──► acknowledged ──► resolved
     │  ╲         │  ▲            ▲
     │   ╲        ▼  │            │
     │    ╰──► escalated ─────────┘
     ╰───────────────────────────►┘

``resolved`` is final. Callers own the transaction: every function flushes and the caller
commits. Escalation's webhook is sent only once the caller's commit has succeeded (nothing is
announced that was rolled back, and no HTTP call runs while a database transaction is open); the
delivery's attempts are then written to ``details["webhook"]`` in a transaction of their own.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from kensa.monitoring.escalation import deliver
from kensa.settings import Settings
from kensa.store.audit import append_event
from kensa.store.models import ALERT_KINDS, ALERT_LEVELS, ALERT_STATUSES, Alert, utcnow

log = logging.getLogger("kensa.monitoring.alerts")

# Who acts in the audit trail when the monitor (not a person) opens or escalates an alert.
SYSTEM_ACTOR = "kensa-monitor"
WEBHOOK_ACTOR = "kensa-escalation"
ACTIVE_STATUSES: tuple[str, ...] = ("open", "acknowledged", "escalated")

# Target state -> the states it may be reached from.
_ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "acknowledged": ("open", "escalated"),
    "escalated": ("open", "acknowledged"),
    "resolved": ("open", "acknowledged", "escalated"),
}
_PENDING_KEY = "kensa.pending_webhooks"


class AlertStateError(ValueError):
    """The requested change is not allowed from the alert's current state."""


def get_alert(session: Session, alert_id: int, *, lock: bool = False) -> Alert:
    """The alert with this id; ``LookupError`` when there is none."""
    alert = session.get(Alert, alert_id, with_for_update=lock or None)
    if alert is None:
        raise LookupError(f"alert {alert_id} does not exist")
    return alert


def list_alerts(
    session: Session,
    *,
    status: str | None = None,
    line_id: str | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[Alert]:
    """Alerts, newest first, optionally filtered; ``status="active"`` means not yet resolved."""
    query = select(Alert).order_by(Alert.created_at.desc(), Alert.id.desc()).limit(limit)
    if status == "active":
        query = query.where(Alert.status.in_(ACTIVE_STATUSES))
    elif status is not None:
        _check_choice("status", status, (*ALERT_STATUSES, "active"))
        query = query.where(Alert.status == status)
    if kind is not None:
        _check_choice("kind", kind, ALERT_KINDS)
        query = query.where(Alert.kind == kind)
    if line_id is not None:
        query = query.where(Alert.line_id == line_id)
    return list(session.scalars(query))


def find_active(
    session: Session, *, kind: str, line_id: str | None, camera_id: str | None, cause_key: str
) -> Alert | None:
    """The newest unresolved alert for the same kind, line, camera and cause key, if any.

    ``cause_key`` (kept in ``details["key"]``) separates independent problems on one line, e.g.
    an SPC alert on the defect rate from one on the review rate.
    """
    query = (
        select(Alert).where(Alert.kind == kind, Alert.status.in_(ACTIVE_STATUSES)).order_by(Alert.id.desc())
    )
    query = query.where(Alert.line_id == line_id if line_id is not None else Alert.line_id.is_(None))
    query = query.where(Alert.camera_id == camera_id if camera_id is not None else Alert.camera_id.is_(None))
    for alert in session.scalars(query):
        if (alert.details or {}).get("key") == cause_key:
            return alert
    return None


def open_alert(
    session: Session,
    *,
    level: str,
    kind: str,
    cause: str,
    line_id: str | None,
    camera_id: str | None = None,
    window_start: datetime | None = None,
    window_end: datetime | None = None,
    window_size: int | None = None,
    top_features: Sequence[Any] | None = None,
    report_uri: str | None = None,
    details: Mapping[str, Any] | None = None,
    actor: str = SYSTEM_ACTOR,
) -> Alert:
    """Open a new alert (status ``open``) and audit it; the caller commits."""
    _check_choice("level", level, ALERT_LEVELS)
    _check_choice("kind", kind, ALERT_KINDS)
    if not cause.strip():
        raise ValueError("an alert needs a cause a person can read; got an empty cause")
    alert = Alert(
        level=level,
        kind=kind,
        cause=cause,
        status="open",
        line_id=line_id,
        camera_id=camera_id,
        window_start=window_start,
        window_end=window_end,
        window_size=window_size,
        top_features=list(top_features or []),
        report_uri=report_uri,
        details=dict(details or {}),
        created_at=utcnow(),
    )
    session.add(alert)
    session.flush()
    append_event(
        session,
        actor=actor,
        action="alert.open",
        subject=f"alert:{alert.id}",
        details={"level": level, "kind": kind, "line_id": line_id, "camera_id": camera_id, "cause": cause},
    )
    log.info(
        "alert_open", extra={"alert_id": alert.id, "alert_level": level, "kind": kind, "line_id": line_id}
    )
    return alert


def acknowledge(session: Session, alert_id: int, *, by: str, comment: str | None = None) -> Alert:
    """A person has seen the alert and is on it (open or escalated → acknowledged)."""
    alert = _transition(session, alert_id, "acknowledged", by=by, comment=comment)
    alert.acknowledged_by = by
    alert.acknowledged_at = utcnow()
    session.flush()
    return alert


def resolve(session: Session, alert_id: int, *, by: str, comment: str | None = None) -> Alert:
    """The cause is dealt with (any unresolved state → resolved, final)."""
    alert = _transition(session, alert_id, "resolved", by=by, comment=comment)
    alert.resolved_by = by
    alert.resolved_at = utcnow()
    session.flush()
    return alert


def escalate(
    session: Session,
    alert_id: int,
    *,
    by: str,
    settings: Settings,
    comment: str | None = None,
) -> Alert:
    """Hand the alert up (open or acknowledged → escalated) and, if configured, call the webhook.

    The webhook POST happens after the caller commits (see the module docstring); the commit
    call then blocks for the delivery, at most ``webhook_attempts`` tries with backoff.
    """
    alert = _transition(session, alert_id, "escalated", by=by, comment=comment)
    alert.escalated_at = utcnow()
    details = dict(alert.details or {})
    details["escalated_by"] = by
    if settings.webhook_url:
        delivery_id = uuid.uuid4().hex
        details["webhook"] = {"status": "pending", "delivery_id": delivery_id, "attempts": []}
        alert.details = details
        session.flush()
        _send_after_commit(session, _Job(alert, alert_payload(alert), delivery_id, settings))
    else:
        details["webhook"] = {"status": "not_configured"}
        alert.details = details
        session.flush()
    return alert


def escalate_overdue(session: Session, settings: Settings, *, now: datetime | None = None) -> list[Alert]:
    """Escalate every critical alert still ``open`` longer than ``settings.escalate_after_s``."""
    cutoff = (now or utcnow()) - timedelta(seconds=settings.escalate_after_s)
    overdue = session.scalars(
        select(Alert)
        .where(Alert.level == "critical", Alert.status == "open", Alert.created_at <= cutoff)
        .order_by(Alert.id)
    ).all()
    return [
        escalate(
            session,
            alert.id,
            by=SYSTEM_ACTOR,
            settings=settings,
            comment=f"not acknowledged within {settings.escalate_after_s:g} s",
        )
        for alert in overdue
    ]


def retry_failed_webhooks(session: Session, settings: Settings) -> list[int]:
    """Queue another delivery for escalated alerts whose webhook failed; sent when the caller commits."""
    if not settings.webhook_url:
        return []
    escalated = session.scalars(select(Alert).where(Alert.status == "escalated")).all()
    queued: list[int] = []
    for alert in escalated:
        hook = dict((alert.details or {}).get("webhook") or {})
        if hook.get("status") != "failed":
            continue
        hook["status"] = "pending"
        alert.details = {**alert.details, "webhook": hook}
        _send_after_commit(session, _Job(alert, alert_payload(alert), str(hook.get("delivery_id")), settings))
        queued.append(alert.id)
    session.flush()
    return queued


def alert_payload(alert: Alert) -> dict[str, Any]:
    """The alert as JSON-ready data (the webhook body and the CLI's ``--json`` output)."""

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    details = alert.details or {}
    return {
        "id": alert.id,
        "level": alert.level,
        "kind": alert.kind,
        "status": alert.status,
        "cause": alert.cause,
        "line_id": alert.line_id,
        "camera_id": alert.camera_id,
        "window_start": iso(alert.window_start),
        "window_end": iso(alert.window_end),
        "window_size": alert.window_size,
        "top_features": list(alert.top_features or []),
        "report_uri": alert.report_uri,
        "created_at": iso(alert.created_at),
        "acknowledged_by": alert.acknowledged_by,
        "acknowledged_at": iso(alert.acknowledged_at),
        "escalated_at": iso(alert.escalated_at),
        "escalated_by": details.get("escalated_by"),
        "resolved_by": alert.resolved_by,
        "resolved_at": iso(alert.resolved_at),
        "comment": alert.comment,
        "estimate": details.get("estimate"),
        "retrain_run": details.get("retrain_run"),
    }


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"alert {name} {value!r} is not one of {', '.join(allowed)}")


def _transition(session: Session, alert_id: int, to: str, *, by: str, comment: str | None) -> Alert:
    if not isinstance(by, str) or not by.strip():
        raise ValueError("say who did it: 'by' must be a non-empty name")
    # Row lock on PostgreSQL so two operators cannot both move the same alert from one state.
    alert = get_alert(session, alert_id, lock=True)
    before = alert.status
    if before not in _ALLOWED_FROM[to]:
        allowed = ", ".join(_ALLOWED_FROM[to])
        raise AlertStateError(f"alert {alert_id} is {before}; it cannot become {to} (only from: {allowed})")
    alert.status = to
    if comment is not None:
        alert.comment = comment
    history = list((alert.details or {}).get("history", []))
    history.append({"at": utcnow().isoformat(), "by": by, "from": before, "to": to, "comment": comment})
    alert.details = {**(alert.details or {}), "history": history}
    session.flush()
    action = {
        "acknowledged": "alert.acknowledge",
        "escalated": "alert.escalate",
        "resolved": "alert.resolve",
    }[to]
    append_event(
        session,
        actor=by,
        action=action,
        subject=f"alert:{alert_id}",
        details={"from": before, "to": to, "comment": comment},
    )
    log.info("alert_transition", extra={"alert_id": alert_id, "from": before, "to": to, "by": by})
    return alert


# --- webhook after commit -------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    alert: Alert
    payload: dict[str, Any]
    delivery_id: str
    settings: Settings


def _send_after_commit(session: Session, job: _Job) -> None:
    session.info.setdefault(_PENDING_KEY, []).append(job)
    if not event.contains(session, "after_commit", _deliver_pending):
        event.listen(session, "after_commit", _deliver_pending)
        event.listen(session, "after_rollback", _drop_pending)


def _drop_pending(session: Session) -> None:
    dropped = session.info.pop(_PENDING_KEY, [])
    if dropped:
        log.info("webhook_dropped", extra={"reason": "rollback", "alert_ids": [j.alert.id for j in dropped]})


def _deliver_pending(session: Session) -> None:
    jobs: list[_Job] = session.info.pop(_PENDING_KEY, [])
    if not jobs:
        return
    bind = session.get_bind()
    for job in jobs:
        s = job.settings
        delivery = deliver(
            s.webhook_url,
            job.payload,
            secret=s.webhook_secret.get_secret_value(),
            attempts=s.webhook_attempts,
            backoff_s=s.webhook_backoff_s,
            delivery_id=job.delivery_id,
        )
        try:
            details = _record_delivery(bind, job.alert.id, delivery.to_dict())
        except SQLAlchemyError:
            # The commit the caller asked for succeeded; failing it now would mislead. The
            # delivery outcome is in the log, and a failed one is retried by the drift flow.
            log.exception("webhook_record_failed", extra={"alert_id": job.alert.id})
            continue
        # Show the outcome on the caller's object without marking it dirty.
        set_committed_value(job.alert, "details", details)


def _record_delivery(bind: Any, alert_id: int, delivery: dict[str, Any]) -> dict[str, Any]:
    engine: Engine = bind
    with Session(bind=engine, expire_on_commit=False) as own:
        alert = get_alert(own, alert_id, lock=True)
        details = dict(alert.details or {})
        previous = dict(details.get("webhook") or {})
        # Redeliveries keep one delivery id and a growing list of attempts.
        attempts = list(previous.get("attempts") or []) + delivery["attempts"]
        details["webhook"] = {**delivery, "attempts": attempts}
        alert.details = details
        append_event(
            own,
            actor=WEBHOOK_ACTOR,
            action="alert.webhook",
            subject=f"alert:{alert_id}",
            details={
                "status": delivery["status"],
                "delivery_id": delivery["delivery_id"],
                "attempts": len(delivery["attempts"]),
                "target": delivery["target"],
            },
        )
        own.commit()
        return details
