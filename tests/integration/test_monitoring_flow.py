"""The drift-check flow over a real PostgreSQL store: quiet on a clean stream, one alert on a shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from monitoring_helpers import log_parts, make_parts, reference
from sqlalchemy import func, select

from kensa.flows.drift_check import run_drift_check
from kensa.settings import Settings
from kensa.store.audit import verify_chain
from kensa.store.connect import open_store
from kensa.store.models import Alert, AuditEvent, DriftResult, ReviewItem

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_drift_flow_alerts_once_on_a_lighting_drop_and_starts_one_retraining(
    tmp_path: Path, fresh_pg_url: str
) -> None:
    settings = Settings(data_dir=tmp_path / "kensa", store_url=fresh_pg_url, mlflow_tracking_uri="")
    sessions = open_store(settings)
    rng = np.random.default_rng(11)
    ref_path = reference(rng).save(tmp_path / "reference.npz")
    images = tmp_path / "images"
    params = {"reference_path": str(ref_path), "retrain": False}

    log_parts(sessions, make_parts(rng, 1000), image_dir=images)
    clean = run_drift_check(settings, reports=False, **params)
    assert clean["alerts"] == [] and clean["review_items"] == 0
    assert clean["groups"][0]["windows"] == (1000 - 200) // 50 + 1
    assert clean["groups"][0]["last"]["reliable"] is True

    # The lamp dims: brightness drops by a standard deviation from part 1,000 on.
    log_parts(sessions, make_parts(rng, 400, shift={"brightness": -4.0}), image_dir=images)
    shifted = run_drift_check(settings, **params)
    assert len(shifted["critical_drift"]) == 1
    alert_id = shifted["critical_drift"][0]
    with sessions() as session:
        alert = session.get(Alert, alert_id)
        assert alert is not None and (alert.level, alert.kind, alert.status) == ("critical", "drift", "open")
        assert alert.top_features[0]["name"] == "brightness: mean"
        assert alert.details["estimate"]["reliable"] is False
        report = Path(alert.report_uri or "")
        assert report.is_file() and "brightness" in report.read_text(errors="ignore")
        queued = session.scalars(select(ReviewItem).where(ReviewItem.alert_id == alert_id)).all()
        assert 0 < len(queued) <= 20
        assert {q.reason for q in queued} == {"drift"}
        assert all(Path(q.image_path).is_file() for q in queued)
        results = session.scalar(select(func.count()).select_from(DriftResult))
    assert results == clean["groups"][0]["windows"] + 8

    # Nothing new in the log: nothing new scored, no second alert. With retraining on, the
    # critical alert starts exactly one retraining (here it fails at once: no champion exists).
    again = run_drift_check(settings, reference_path=str(ref_path), retrain=True)
    assert again["results"] == [] and again["alerts"] == []
    assert list(again["retraining"]) == [str(alert_id)]
    once_more = run_drift_check(settings, reference_path=str(ref_path), retrain=True)
    assert once_more["retraining"] == {}
    with sessions() as session:
        alert = session.get(Alert, alert_id)
        assert alert is not None and alert.details["retrain_run"] == again["retraining"][str(alert_id)]
        actions = session.scalars(
            select(AuditEvent.action).where(AuditEvent.subject == f"alert:{alert_id}")
        ).all()
        assert actions == ["alert.open", "alert.retrain"]
        assert verify_chain(session) == []


def test_two_critical_alerts_of_one_check_share_one_retraining(tmp_path: Path, fresh_pg_url: str) -> None:
    """The lamp dims over two cameras: two alerts, one retraining of the champion, both linked."""
    from kensa.flows.drift_check import start_retraining_for

    settings = Settings(data_dir=tmp_path / "kensa", store_url=fresh_pg_url, mlflow_tracking_uri="")
    sessions = open_store(settings)
    with sessions() as session:
        alerts = [Alert(level="critical", kind="drift", cause="lighting", line_id="L1", camera_id=c)
                  for c in ("C1", "C2")]  # fmt: skip
        warning = Alert(level="warning", kind="drift", cause="lighting", line_id="L2")
        session.add_all([*alerts, warning])
        session.commit()
        ids = [a.id for a in alerts]

    # No champion is registered here, so the run fails at once; it is still one run for both.
    started = start_retraining_for(settings)
    assert sorted(started) == ids
    assert len(set(started.values())) == 1
    assert start_retraining_for(settings) == {}  # claimed: a later check starts nothing more
    with sessions() as session:
        runs = {a.id: a.details.get("retrain_run") for a in session.scalars(select(Alert))}
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "alert.retrain")).all()
    assert runs == {ids[0]: started[ids[0]], ids[1]: started[ids[0]], warning.id: None}
    assert sorted(e.subject for e in events) == [f"alert:{i}" for i in ids]
