"""``kensa drift`` and ``kensa alerts``: run the drift check, and handle the alerts it raises."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import console, fail, get_settings, print_json

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

drift_app = typer.Typer(help="Drift monitoring of the prediction stream.", no_args_is_help=True)
alerts_app = typer.Typer(
    help="Drift and SPC alerts: list, acknowledge, escalate, resolve.", no_args_is_help=True
)


class DriftMode(StrEnum):
    """How windows are cut: every window/4 parts, or every KENSA_DRIFT_WINDOW_S seconds."""

    COUNT = "count"
    TIME = "time"


class AlertStatus(StrEnum):
    """``kensa alerts list --status``: a stored status, or ``active`` (not resolved) or ``all``."""

    ACTIVE = "active"
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"
    RESOLVED = "resolved"
    ALL = "all"


def _session() -> Session:
    from kensa.store.connect import open_store

    return open_store(get_settings())()


@drift_app.command("check")
def check_cmd(
    line: Annotated[str | None, typer.Option("--line", help="Only this line (default: every line).")] = None,
    window: Annotated[
        int | None, typer.Option("--window", help="Parts per window (default KENSA_DRIFT_WINDOW).")
    ] = None,
    mode: Annotated[
        DriftMode,
        typer.Option("--mode", help="count (every window/4 parts) | time (KENSA_DRIFT_WINDOW_S)."),
    ] = DriftMode.COUNT,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference", help="A reference profile (.npz) to use instead of the model version's own."
        ),
    ] = None,
    reports: Annotated[
        bool, typer.Option("--reports/--no-reports", help="Write Evidently HTML reports for alerts.")
    ] = True,
    retrain: Annotated[
        bool, typer.Option("--retrain/--no-retrain", help="Start retraining on critical drift.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Score the windows completed since the last check; raise alerts; start retraining if due."""
    if window is not None and window < 20:
        raise fail(f"--window {window} is too small; a drift window needs at least 20 parts")
    if reference is not None and not reference.is_file():
        raise fail(f"--reference {reference} is not a file; pass a reference profile (.npz)")
    from kensa.flows.drift_check import run_drift_check

    settings = get_settings()
    try:
        outcome = run_drift_check(
            settings,
            line_id=line,
            window=window,
            mode=mode.value,
            reference_path=str(reference) if reference else None,
            reports=reports,
            retrain=retrain,
        )
    except ValueError as exc:  # an unreadable reference profile, a bad option value
        raise fail(str(exc)) from exc
    if as_json:
        print_json(outcome)
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
        escape(
            f"alerts opened: {outcome['alerts'] or 'none'}; review items queued: {outcome['review_items']}; "
            f"escalated: {outcome['escalated'] or 'none'}; "
            f"retraining started: {outcome['retraining'] or 'none'}"
        )
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
    status: Annotated[
        AlertStatus,
        typer.Option("--status", help="active | open | acknowledged | escalated | resolved | all"),
    ] = AlertStatus.ACTIVE,
    line: Annotated[str | None, typer.Option("--line", help="Only this line.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Alerts, newest first (default: those not yet resolved)."""
    from kensa.monitoring.alerts import alert_payload, list_alerts

    chosen = None if status is AlertStatus.ALL else status.value
    with _session() as session:
        alerts = list_alerts(session, status=chosen, line_id=line, limit=limit)
        if as_json:
            print_json([alert_payload(a) for a in alerts])
            return
        table = Table(
            "id", "level", "kind", "status", "line/camera", "created (UTC)", "cause", title="alerts"
        )
        for alert in alerts:
            table.add_row(*_alert_row(alert))
        console.print(table if alerts else f"no {status.value} alerts")


@alerts_app.command("show")
def show_cmd(
    alert_id: Annotated[int, typer.Argument(help="The alert's id (see `kensa alerts list`).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Accepted like every read command's; show always prints JSON.")
    ] = False,
) -> None:
    """Everything about one alert, as JSON: what moved, the estimate, the report, the webhook, retraining."""
    del as_json  # the output is JSON with or without it
    from kensa.monitoring.alerts import alert_payload, get_alert

    with _session() as session:
        try:
            alert = get_alert(session, alert_id)
        except LookupError as exc:
            raise fail(f"{exc}; see `kensa alerts list --status all`") from exc
        payload = alert_payload(alert)
        payload["webhook"] = (alert.details or {}).get("webhook")
        payload["history"] = (alert.details or {}).get("history", [])
        print_json(payload)


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
            raise fail(f"{exc}; see `kensa alerts list --status all`") from exc
        except ValueError as exc:  # AlertStateError, or an empty --by
            raise fail(str(exc)) from exc
        session.commit()  # an escalation's webhook goes out here, after the change is stored
        console.print(f"alert {alert.id} is now {alert.status} (by {escape(by)})")
        hook = (alert.details or {}).get("webhook") if action == "escalate" else None
        if hook:
            attempts = len(hook.get("attempts") or [])
            shown = escape(str(hook.get("status")))
            console.print(
                f"webhook: {shown} after {attempts} attempt(s)" if attempts else f"webhook: {shown}"
            )


@alerts_app.command("ack")
def ack_cmd(
    alert_id: Annotated[int, typer.Argument(help="The alert's id.")],
    by: Annotated[str, typer.Option("--by", help="Who is taking it.")],
    comment: Annotated[str | None, typer.Option("--comment")] = None,
) -> None:
    """Acknowledge an alert: someone is on it (stops its escalation clock)."""
    _transition("ack", alert_id, by, comment)


@alerts_app.command("escalate")
def escalate_cmd(
    alert_id: Annotated[int, typer.Argument(help="The alert's id.")],
    by: Annotated[str, typer.Option("--by", help="Who escalates it.")] = "cli",
    comment: Annotated[str | None, typer.Option("--comment")] = None,
    retrain: Annotated[
        bool,
        typer.Option("--retrain", help="Start retraining now (otherwise the next drift check starts it)."),
    ] = False,
) -> None:
    """Escalate an alert: the webhook is called and retraining is started for it."""
    _transition("escalate", alert_id, by, comment)
    if retrain:
        from kensa.flows.drift_check import start_retraining_for

        started = start_retraining_for(get_settings(), [alert_id])
        console.print(f"retraining: {escape(str(started.get(alert_id, 'not started (see the alert)')))}")


@alerts_app.command("resolve")
def resolve_cmd(
    alert_id: Annotated[int, typer.Argument(help="The alert's id.")],
    by: Annotated[str, typer.Option("--by", help="Who resolved it.")],
    comment: Annotated[str | None, typer.Option("--comment")] = None,
) -> None:
    """Resolve an alert (final)."""
    _transition("resolve", alert_id, by, comment)
