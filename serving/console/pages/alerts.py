"""Alerts: the list by level and age; one alert with what moved, control charts and its Evidently
report; acknowledge, escalate and resolve with a comment (monitoring.alerts does the moves)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Form, Path, Query, Request
from starlette.responses import FileResponse, Response

from kensa.monitoring import alerts as lifecycle
from kensa.serving.console.alertview import (
    drift_chart,
    moved_features,
    rate_charts,
    report_file,
    window_estimate,
)
from kensa.serving.console.context import console_of
from kensa.serving.console.web import ConsoleError, user_of
from kensa.serving.security.auth import ALERT_HANDLERS, CONSOLE_PREFIX
from kensa.store.models import ALERT_LEVELS, ALERT_STATUSES

router = APIRouter()

STATUS_FILTERS = ("active", *ALERT_STATUSES, "all")
_LEVEL_ORDER = {level: i for i, level in enumerate(reversed(ALERT_LEVELS))}  # critical first
# The report is the monitor's HTML (Evidently: inline scripts and styles). It runs sandboxed in an
# opaque origin: it can draw, but cannot read the console's cookies or pages, or call anything.
REPORT_CSP = (
    "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval' data: blob:; "
    "style-src 'unsafe-inline' data:; img-src data: blob:; font-src data:; connect-src 'none'; "
    "frame-ancestors 'self'"
)
CommentForm = Form("", max_length=2000)


@router.get("/alerts")
def alerts_page(
    request: Request,
    status: str = Query("active", max_length=20),
    level: str | None = Query(None, max_length=20),
    line: str | None = Query(None, max_length=255),
) -> Response:
    if status not in STATUS_FILTERS:
        raise ConsoleError(
            422, "invalid_filter", f"status {status[:20]!r} is not one of {', '.join(STATUS_FILTERS)}"
        )
    if level is not None and level not in ALERT_LEVELS:
        raise ConsoleError(
            422, "invalid_filter", f"level {level[:20]!r} is not one of {', '.join(ALERT_LEVELS)}"
        )
    console = console_of(request)
    with console.sessions() as session:
        rows = lifecycle.list_alerts(
            session, status=None if status == "all" else status, line_id=line or None, limit=500
        )
    if level is not None:
        rows = [a for a in rows if a.level == level]
    # By level (critical first), then newest first: list_alerts is newest first and sort is stable.
    rows.sort(key=lambda a: _LEVEL_ORDER.get(a.level, 99))
    return console.pages.render(
        request,
        "alerts.html",
        {
            "nav": "alerts",
            "alerts": rows,
            "status": status,
            "level": level,
            "line": line,
            "statuses": STATUS_FILTERS,
            "levels": ALERT_LEVELS,
        },
    )


@router.get("/alerts/{alert_id}")
def alert_page(request: Request, alert_id: int = Path(..., ge=1)) -> Response:
    console = console_of(request)
    user = user_of(request)
    with console.sessions() as session:
        try:
            alert = lifecycle.get_alert(session, alert_id)
        except LookupError as exc:
            raise ConsoleError(404, "unknown_alert", str(exc)) from None
        features, feature_chart = moved_features(session, alert)
        charts = [c for c in [drift_chart(session, alert), *rate_charts(session, alert)] if c is not None]
    report = report_file(alert, console.settings.data_dir)
    return console.pages.render(
        request,
        "alert.html",
        {
            "nav": "alerts",
            "alert": alert,
            "features": features,
            "feature_chart": feature_chart,
            "charts": charts,
            "has_report": report is not None,
            "history": list((alert.details or {}).get("history", [])),
            "webhook": (alert.details or {}).get("webhook"),
            "can_act": user.role in ALERT_HANDLERS,
            "moves": _moves(alert.status),
            "estimate": window_estimate(alert),
        },
    )


def _moves(status: str) -> list[tuple[str, str]]:
    """The buttons an alert in ``status`` offers: (action, label)."""
    moves = []
    if status in ("open", "escalated"):
        moves.append(("acknowledge", "Acknowledge"))
    if status in ("open", "acknowledged"):
        moves.append(("escalate", "Escalate"))
    if status != "resolved":
        moves.append(("resolve", "Resolve"))
    return moves


@router.get("/alerts/{alert_id}/report")
def alert_report(request: Request, alert_id: int = Path(..., ge=1)) -> Response:
    console = console_of(request)
    with console.sessions() as session:
        try:
            alert = lifecycle.get_alert(session, alert_id)
        except LookupError as exc:
            raise ConsoleError(404, "unknown_alert", str(exc)) from None
    path = report_file(alert, console.settings.data_dir)
    if path is None:
        raise ConsoleError(404, "no_report", f"alert {alert_id} has no report file in the data directory")
    headers = {"content-security-policy": REPORT_CSP, "x-frame-options": "SAMEORIGIN"}
    return FileResponse(path, media_type="text/html; charset=utf-8", headers=headers)


def _act(request: Request, alert_id: int, verb: str, move: Callable[..., Any], comment: str) -> Response:
    console = console_of(request)
    user = user_of(request)
    text = comment.strip() or None
    extra = {"settings": console.settings} if verb == "escalate" else {}
    with console.sessions() as session:
        try:
            move(session, alert_id, by=user.actor, comment=text, **extra)
        except LookupError as exc:
            raise ConsoleError(404, "unknown_alert", str(exc)) from None
        except lifecycle.AlertStateError as exc:
            session.rollback()
            raise ConsoleError(409, "alert_state", str(exc)) from None
        session.commit()  # an escalation's webhook goes out after this commit
    done = {"acknowledge": "acknowledged", "escalate": "escalated", "resolve": "resolved"}[verb]
    return console.pages.redirect(
        request, f"{CONSOLE_PREFIX}/alerts/{alert_id}", ("ok", f"Alert {alert_id} {done} by {user.actor}.")
    )


@router.post("/alerts/{alert_id}/acknowledge")
def acknowledge(request: Request, alert_id: int = Path(..., ge=1), comment: str = CommentForm) -> Response:
    return _act(request, alert_id, "acknowledge", lifecycle.acknowledge, comment)


@router.post("/alerts/{alert_id}/escalate")
def escalate(request: Request, alert_id: int = Path(..., ge=1), comment: str = CommentForm) -> Response:
    return _act(request, alert_id, "escalate", lifecycle.escalate, comment)


@router.post("/alerts/{alert_id}/resolve")
def resolve(request: Request, alert_id: int = Path(..., ge=1), comment: str = CommentForm) -> Response:
    return _act(request, alert_id, "resolve", lifecycle.resolve, comment)
