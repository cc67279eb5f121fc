"""``kensa drift`` and ``kensa alerts``: run the drift check, and handle the alerts it raises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import EXIT_INVALID, console, err_console, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

drift_app = typer.Typer(help="Drift monitoring of the prediction stream.", no_args_is_help=True)
alerts_app = typer.Typer(
    help="Drift and SPC alerts: list, acknowledge, escalate, resolve.", no_args_is_help=True
)

STATUS_CHOICES = ("active", "open", "acknowledged", "escalated", "resolved", "all")


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]{escape(message)}[/red]")
    return typer.Exit(EXIT_INVALID)


def _session() -> Session:
    from kensa.store.connect import open_store

    return open_store(get_settings())()


@drift_app.command("check")
def check_cmd(
    line: str | None = typer.Option(None, "--line", help="Only this line (default: every line)."),
    window: int | None = typer.Option(
        None, "--window", help="Parts per window (default KENSA_DRIFT_WINDOW)."
    ),
    mode: str = typer.Option(
        "count", "--mode", help="count (every window/4 parts) | time (KENSA_DRIFT_WINDOW_S)."
    ),
    reference: Path | None = typer.Option(
        None, "--reference", help="A reference profile (.npz) to use instead of the model version's own."
    ),
    reports: bool = typer.Option(
        True, "--reports/--no-reports", help="Write Evidently HTML reports for alerts."
    ),
    retrain: bool = typer.Option(True, "--retrain/--no-retrain", help="Start retraining on critical drift."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Score the windows completed since the last check; raise alerts; start retraining if due."""
    if window is not None and window < 20:
        raise _fail(f"--window {window} is too small; a drift window needs at least 20 parts")
    if mode not in ("count", "time"):
        raise _fail(f"--mode {mode!r} is not one of: count, time")
    if reference is not None and not reference.is_file():
        raise _fail(f"--reference {reference} is not a file; pass a reference profile (.npz)")
    from kensa.flows.drift_check import run_drift_check

    settings = get_settings()
    try:
        outcome = run_drift_check(
            settings,
            line_id=line,
            window=window,
            mode=mode,
            reference_path=str(reference) if reference else None,
            reports=reports,
            retrain=retrain,
        )
    except ValueError as exc:  # an unreadable reference profile, a bad option value
        raise _fail(str(exc)) from exc
    if as_json:
        print(json.dumps(outcome, indent=2, default=str))  # noqa: T201
        return
    table = Table(
        "line/camera (model)", "windows", "levels", "last score", "est. escape rate", title="drift check"
    )
    for g in outcome["groups"]:
        last = g.get("last") or {}
        rate = last.get("expected_escape_rate")
        est = "–" if rate is None else f"{rate:.2%}" + ("" if last.get("reliable") else " (unreliable)")
        score = f"{last['score']:.2f} {last['level']}" if "score" in last else (g.get("skipped") or "–")
        table.add_row(escape(g["group"]), str(g["windows"]), escape(str(g["levels"])), escape(score), est)
    console.print(table)
    if not outcome["groups"]:
        console.print("no predictions in the log yet")
    console.print(
        f"alerts opened: {outcome['alerts'] or 'none'}; review items queued: {outcome['review_items']}; "
        f"escalated: {outcome['escalated'] or 'none'}; retraining started: {outcome['retraining'] or 'none'}"
    )
    for path in outcome["reports"]:
        console.print(f"report: {escape(path)}")


def _alert_row(alert: Any) -> list[str]:
    return [
        str(alert.id),
        alert.level,
        alert.kind,
        alert.status,
        escape(alert.line_id or "–") + (f"/{escape(alert.camera_id)}" if alert.camera_id else ""),
        alert.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        escape(alert.cause[:120]),
    ]


@alerts_app.command("list")
def list_cmd(
    status: str = typer.Option(
        "active", "--status", help="active | open | acknowledged | escalated | resolved | all"
    ),
    line: str | None = typer.Option(None, "--line", help="Only this line."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Alerts, newest first (default: those not yet resolved)."""
    if status not in STATUS_CHOICES:
        raise _fail(f"--status {status!r} is not one of: {', '.join(STATUS_CHOICES)}")
    from kensa.monitoring.alerts import alert_payload, list_alerts

    with _session() as session:
        alerts = list_alerts(session, status=None if status == "all" else status, line_id=line, limit=limit)
        if as_json:
            print(json.dumps([alert_payload(a) for a in alerts], indent=2))  # noqa: T201
            return
        table = Table(
            "id", "level", "kind", "status", "line/camera", "created (UTC)", "cause", title="alerts"
        )
        for alert in alerts:
            table.add_row(*_alert_row(alert))
        console.print(table if alerts else f"no {status} alerts")


@alerts_app.command("show")
def show_cmd(alert_id: int = typer.Argument(..., help="The alert's id (see `kensa alerts list`).")) -> None:
    """Everything about one alert: what moved, the estimate, the report, the webhook, retraining."""
    from kensa.monitoring.alerts import alert_payload, get_alert

    with _session() as session:
        try:
            alert = get_alert(session, alert_id)
        except LookupError as exc:
            raise _fail(f"{exc}; see `kensa alerts list --status all`") from exc
        payload = alert_payload(alert)
        payload["webhook"] = (alert.details or {}).get("webhook")
        payload["history"] = (alert.details or {}).get("history", [])
        print(json.dumps(payload, indent=2, default=str))  # noqa: T201


def _transition(action: str, alert_id: int, by: str, comment: str | None) -> None:
    from kensa.monitoring import alerts

    settings = get_settings()
    with _session() as session:
        try:
            if action == "ack":
                alert = alerts.acknowledge(session, alert_id, by=by, comment=comment)
            elif action == "escalate":
                alert = alerts.escalate(session, alert_id, by=by, settings=settings, comment=comment)
            else:
                alert = alerts.resolve(session, alert_id, by=by, comment=comment)
        except LookupError as exc:
            raise _fail(f"{exc}; see `kensa alerts list --status all`") from exc
        except ValueError as exc:  # AlertStateError, or an empty --by
            raise _fail(str(exc)) from exc
        session.commit()  # an escalation's webhook goes out here, after the change is stored
        console.print(f"alert {alert.id} is now {alert.status} (by {escape(by)})")
        hook = (alert.details or {}).get("webhook") if action == "escalate" else None
        if hook:
            attempts = len(hook.get("attempts") or [])
            console.print(
                f"webhook: {hook.get('status')} after {attempts} attempt(s)"
                if attempts
                else f"webhook: {hook.get('status')}"
            )


@alerts_app.command("ack")
def ack_cmd(
    alert_id: int = typer.Argument(..., help="The alert's id."),
    by: str = typer.Option(..., "--by", help="Who is taking it."),
    comment: str | None = typer.Option(None, "--comment"),
) -> None:
    """Acknowledge an alert: someone is on it (stops its escalation clock)."""
    _transition("ack", alert_id, by, comment)


@alerts_app.command("escalate")
def escalate_cmd(
    alert_id: int = typer.Argument(..., help="The alert's id."),
    by: str = typer.Option("cli", "--by", help="Who escalates it."),
    comment: str | None = typer.Option(None, "--comment"),
    retrain: bool = typer.Option(
        False, "--retrain", help="Start retraining now (otherwise the next drift check starts it)."
    ),
) -> None:
    """Escalate an alert: the webhook is called and retraining is started for it."""
    _transition("escalate", alert_id, by, comment)
    if retrain:
        from kensa.flows.drift_check import start_retraining_for

        started = start_retraining_for(get_settings(), [alert_id])
        console.print(f"retraining: {started.get(alert_id, 'not started (see the alert)')}")


@alerts_app.command("resolve")
def resolve_cmd(
    alert_id: int = typer.Argument(..., help="The alert's id."),
    by: str = typer.Option(..., "--by", help="Who resolved it."),
    comment: str | None = typer.Option(None, "--comment"),
) -> None:
    """Resolve an alert (final)."""
    _transition("resolve", alert_id, by, comment)
