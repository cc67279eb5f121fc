"""Prefect flow `drift-check`: the drift job over the prediction log, escalation, and retraining.

One run: score every new window per line and camera (``monitoring.drift``), keep the Evidently
reports (local artifact store; also MLflow when a tracking server is configured), escalate critical
alerts nobody acknowledged in time and re-send failed escalation webhooks, then start retraining
(``flows.retrain.start_retraining``) for each critical drift alert and each alert a person escalated
that has not started one yet. ``details["retrain_run"]`` on the alert holds the flow-run id, so one
alert starts one retraining. Runs on demand (``kensa drift check``) and on a schedule (a deployment
with an interval schedule pointing at :func:`drift_check`).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kensa.monitoring.alerts import SYSTEM_ACTOR, escalate_overdue, retry_failed_webhooks
from kensa.monitoring.drift import CheckOptions, CheckOutcome, ReferenceLookup, check_drift
from kensa.monitoring.reference import fetch_reference, load_reference
from kensa.settings import Settings
from kensa.store.audit import append_event
from kensa.store.connect import open_store
from kensa.store.models import Alert

log = logging.getLogger("kensa.flows.monitor")

MAX_RETRAIN_ATTEMPTS = 3
# Settings reach an in-process run through this variable, not a flow parameter: parameters are
# stored in Prefect's database, and Settings may hold secrets (webhook key, store URL).
_SETTINGS: ContextVar[Settings | None] = ContextVar("kensa_monitor_settings", default=None)


def _lookup(settings: Settings, reference_path: str | None) -> ReferenceLookup:
    if reference_path:
        profile = load_reference(Path(reference_path))
        return lambda _name, _version: profile
    return lambda name, version: fetch_reference(settings, name, version)


# Every task here is store, MLflow or webhook I/O, and safe to run again: a drift check resumes
# after the last window it committed, escalation and webhook resends look at what is still due,
# and an alert claimed for retraining is not claimed twice. So each is retried.
@task(name="score-windows", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def score_task(settings: Settings, options: CheckOptions, reference_path: str | None) -> CheckOutcome:
    return check_drift(open_store(settings), settings, options, references=_lookup(settings, reference_path))


@task(name="archive-reports", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def archive_reports(settings: Settings, reports: list[str]) -> dict[str, str]:
    """Log the HTML reports to MLflow when a tracking server is configured (local files otherwise)."""
    if not reports or not settings.mlflow_tracking_uri:
        return {}
    import mlflow

    from kensa.flows.tracking import configure_mlflow, ensure_experiment

    configure_mlflow(settings)
    experiment = ensure_experiment(settings, "kensa-monitoring")
    uris = {}
    with mlflow.start_run(experiment_id=experiment, run_name="drift-check") as run:
        for path in reports:
            mlflow.log_artifact(path, "drift-reports")
            uris[path] = f"runs:/{run.info.run_id}/drift-reports/{Path(path).name}"
    return uris


@task(name="escalate-overdue", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def escalate_task(settings: Settings) -> dict[str, list[int]]:
    """Escalate unacknowledged critical alerts; re-send failed webhooks (sent after the commit)."""
    with open_store(settings)() as session:
        escalated = [a.id for a in escalate_overdue(session, settings)]
        resent = retry_failed_webhooks(session, settings)
        session.commit()
    return {"escalated": escalated, "resent": resent}


def _needs_retraining(alert: Alert) -> bool:
    details = alert.details or {}
    if details.get("retrain_run") or int(details.get("retrain_attempts", 0)) >= MAX_RETRAIN_ATTEMPTS:
        return False
    if alert.status == "resolved":
        return False
    critical_drift = alert.kind == "drift" and alert.level == "critical"
    escalated_by_person = alert.status == "escalated" and details.get("escalated_by") != SYSTEM_ACTOR
    return critical_drift or escalated_by_person


def _claim(sessions: sessionmaker[Session], alert_id: int) -> bool:
    """Mark the alert as starting a retraining; False if another run got there first."""
    with sessions() as session:
        alert = session.get(Alert, alert_id, with_for_update=True)
        if alert is None or not _needs_retraining(alert):
            return False
        alert.details = {**alert.details, "retrain_run": "starting"}
        session.commit()
        return True


@task(name="start-retraining", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def retrain_task(settings: Settings) -> dict[int, str]:
    """Start one retraining for the alerts that call for it; record the run id on each."""
    return start_retraining_for(settings)


def start_retraining_for(settings: Settings, alert_ids: list[int] | None = None) -> dict[int, str]:
    """Start one retraining for the alerts (default: every unresolved one) that call for it.

    An alert calls for it when it is a critical drift alert or a person escalated it, and has no
    retraining yet (``details["retrain_run"]``). The retraining flow retrains the champion, so one
    run answers every such alert of this check (one lamp dimming on two cameras raised two alerts
    and paid for two identical retrainings before); each alert records the run. Returns alert id
    -> flow-run id for the alerts it covers.
    """
    from kensa.flows.retrain import start_retraining

    sessions = open_store(settings)
    with sessions() as session:
        query = select(Alert).where(Alert.status != "resolved").order_by(Alert.id)
        if alert_ids is not None:
            query = query.where(Alert.id.in_(alert_ids))
        candidates = [a.id for a in session.scalars(query) if _needs_retraining(a)]
    claimed = [alert_id for alert_id in candidates if _claim(sessions, alert_id)]
    if not claimed:
        return {}
    reason = ("alert " if len(claimed) == 1 else "alerts ") + ", ".join(map(str, claimed))
    try:
        run_id: str | None = start_retraining(settings, alert_id=claimed[0], reason=reason)
        error = None
    except Exception as exc:  # noqa: BLE001 - any failure is recorded on the alerts, never lost
        run_id, error = None, f"{type(exc).__name__}: {exc}"[:500]
        log.exception("retrain_start_failed", extra={"alerts": claimed})
    started: dict[int, str] = {}
    with sessions() as session:
        for alert_id in claimed:
            alert = session.get(Alert, alert_id, with_for_update=True)
            assert alert is not None
            details = dict(alert.details)
            if run_id is not None:
                details["retrain_run"] = run_id
                started[alert_id] = run_id
            else:
                details.pop("retrain_run", None)
                details["retrain_attempts"] = int(details.get("retrain_attempts", 0)) + 1
                details["retrain_error"] = error
            alert.details = details
            append_event(
                session,
                actor=SYSTEM_ACTOR,
                action="alert.retrain",
                subject=f"alert:{alert_id}",
                details={"flow_run": run_id, "error": error, "alerts": claimed},
            )
        session.commit()
    return started


def _record_report_uris(settings: Settings, uris: dict[str, str]) -> None:
    if not uris:
        return
    with open_store(settings)() as session:
        for alert in session.scalars(select(Alert).where(Alert.report_uri.in_(list(uris)))):
            alert.details = {**alert.details, "report_mlflow": uris[alert.report_uri or ""]}
        session.commit()


def _summary(outcome: CheckOutcome, escalation: dict[str, list[int]], started: dict[int, str]) -> str:
    lines = ["| line/camera | windows | levels | last score | est. escape rate |", "|---|---|---|---|---|"]
    for g in outcome.groups:
        last = g.last or {}
        rate = last.get("expected_escape_rate")
        est = "–" if rate is None else f"{rate:.2%}" + ("" if last.get("reliable") else " (unreliable)")
        score = f"{last['score']:.2f} {last['level']}" if "score" in last else g.skipped or "–"
        lines.append(f"| {g.group} | {g.windows} | {g.levels} | {score} | {est} |")
    lines.append(
        f"\nalerts opened: {outcome.alerts}; critical drift: {outcome.critical_drift}; "
        f"review items: {outcome.review_items}; escalated: {escalation['escalated']}; "
        f"retraining started: {started}"
    )
    return "\n".join(lines)


@flow(name="drift-check", log_prints=True)
def drift_check(
    line_id: str | None = None,
    window: int | None = None,
    mode: str = "count",
    reference_path: str | None = None,
    reports: bool = True,
    retrain: bool = True,
) -> dict[str, Any]:
    """Drift windows → alerts, reports, review samples → escalation → retraining. Returns a summary."""
    logger = get_run_logger()
    settings = _SETTINGS.get() or Settings()  # a deployment run is its own entry point
    options = CheckOptions.from_settings(settings, line_id=line_id, window=window, mode=mode, reports=reports)
    outcome = score_task(settings, options, reference_path)
    _record_report_uris(settings, archive_reports(settings, outcome.reports))
    escalation = escalate_task(settings)
    started = retrain_task(settings) if retrain else {}
    summary = _summary(outcome, escalation, started)
    logger.info("drift check: %d windows, alerts %s", len(outcome.results), outcome.alerts)
    create_markdown_artifact(
        "## Drift check\n\n" + summary, key="drift-check", description="drift windows and alerts"
    )
    return {**outcome.to_dict(), **escalation, "retraining": {str(k): v for k, v in started.items()}}


def run_drift_check(settings: Settings, **parameters: Any) -> dict[str, Any]:
    """Run the flow in this process with ``settings`` (the CLI's and tests' entry)."""
    token = _SETTINGS.set(settings)
    try:
        result: dict[str, Any] = drift_check(**parameters)
    finally:
        _SETTINGS.reset(token)
    return result
