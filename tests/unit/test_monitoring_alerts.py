"""Alert lifecycle: allowed transitions, refused ones, the audit trail, overdue escalation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from kensa.monitoring.alerts import (
    SYSTEM_ACTOR,
    AlertStateError,
    acknowledge,
    escalate,
    escalate_overdue,
    find_active,
    list_alerts,
    open_alert,
    resolve,
)
from kensa.settings import Settings
from kensa.store.audit import verify_chain
from kensa.store.connect import open_store
from kensa.store.models import AuditEvent, utcnow


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, escalate_after_s=600)


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    with open_store(settings)() as s:
        yield s


def _events(session: Session, alert_id: int) -> list[tuple[str, str]]:
    rows = session.scalars(
        select(AuditEvent).where(AuditEvent.subject == f"alert:{alert_id}").order_by(AuditEvent.id)
    )
    return [(e.actor, e.action) for e in rows]


def _drift(session: Session, level: str = "critical") -> int:
    alert = open_alert(
        session,
        level=level,
        kind="drift",
        cause="brightness: mean -6σ",
        line_id="L1",
        camera_id="C1",
        details={"key": "drift"},
    )
    session.commit()
    return alert.id


def test_open_acknowledge_escalate_resolve_is_audited_step_by_step(
    session: Session, settings: Settings
) -> None:
    alert_id = _drift(session)
    assert find_active(session, kind="drift", line_id="L1", camera_id="C1", cause_key="drift").id == alert_id  # type: ignore[union-attr]
    acknowledge(session, alert_id, by="ann", comment="looking at the lamp")
    session.commit()
    alert = escalate(session, alert_id, by="ann", settings=settings, comment="lamp is fine, need help")
    session.commit()
    assert alert.status == "escalated" and alert.escalated_at is not None
    assert alert.details["escalated_by"] == "ann"
    assert alert.details["webhook"] == {"status": "not_configured"}
    alert = resolve(session, alert_id, by="bob", comment="camera re-aimed")
    session.commit()
    assert (alert.status, alert.acknowledged_by, alert.resolved_by) == ("resolved", "ann", "bob")
    assert [h["to"] for h in alert.details["history"]] == ["acknowledged", "escalated", "resolved"]
    assert _events(session, alert_id) == [
        (SYSTEM_ACTOR, "alert.open"),
        ("ann", "alert.acknowledge"),
        ("ann", "alert.escalate"),
        ("bob", "alert.resolve"),
    ]
    assert verify_chain(session) == []
    assert find_active(session, kind="drift", line_id="L1", camera_id="C1", cause_key="drift") is None
    assert [a.id for a in list_alerts(session, status="resolved")] == [alert_id]


def test_invalid_transitions_are_refused_with_from_and_to_and_change_nothing(
    session: Session, settings: Settings
) -> None:
    alert_id = _drift(session)
    acknowledge(session, alert_id, by="ann")
    session.commit()
    with pytest.raises(AlertStateError, match="alert .* is acknowledged; it cannot become acknowledged"):
        acknowledge(session, alert_id, by="ann")
    resolve(session, alert_id, by="ann")
    session.commit()
    for attempt in (
        lambda: acknowledge(session, alert_id, by="bob"),
        lambda: escalate(session, alert_id, by="bob", settings=settings),
        lambda: resolve(session, alert_id, by="bob"),
    ):
        with pytest.raises(AlertStateError, match="is resolved; it cannot become"):
            attempt()
    session.rollback()
    assert len(_events(session, alert_id)) == 3  # open, acknowledge, resolve: nothing more
    with pytest.raises(LookupError, match="alert 999 does not exist"):
        acknowledge(session, 999, by="ann")
    with pytest.raises(ValueError, match="'by' must be a non-empty name"):
        resolve(session, _drift(session), by="  ")
    with pytest.raises(ValueError, match="level 'severe' is not one of warning, critical"):
        open_alert(session, level="severe", kind="drift", cause="x", line_id="L1")
    with pytest.raises(ValueError, match="status 'closed' is not one of"):
        list_alerts(session, status="closed")


def test_an_escalated_alert_is_taken_by_on_call_and_may_be_escalated_again(
    session: Session, settings: Settings
) -> None:
    alert_id = _drift(session)
    escalate(session, alert_id, by="ann", settings=settings)
    with pytest.raises(AlertStateError, match="is escalated; it cannot become escalated"):
        escalate(session, alert_id, by="ann", settings=settings)
    assert acknowledge(session, alert_id, by="on-call").status == "acknowledged"
    assert escalate(session, alert_id, by="on-call", settings=settings).status == "escalated"
    assert resolve(session, alert_id, by="on-call").status == "resolved"
    session.commit()


def test_only_critical_alerts_left_open_too_long_are_escalated(session: Session, settings: Settings) -> None:
    old = _drift(session, "critical")
    warning = _drift(session, "warning")
    handled = _drift(session, "critical")
    acknowledge(session, handled, by="ann")
    session.commit()
    assert escalate_overdue(session, settings) == []  # nothing is older than 10 minutes yet
    later = utcnow() + timedelta(seconds=601)
    escalated = escalate_overdue(session, settings, now=later)
    session.commit()
    assert [a.id for a in escalated] == [old]
    assert escalated[0].details["escalated_by"] == SYSTEM_ACTOR
    assert "not acknowledged within 600 s" in (escalated[0].comment or "")
    assert {a.id: a.status for a in list_alerts(session)} == {
        old: "escalated",
        warning: "open",
        handled: "acknowledged",
    }
