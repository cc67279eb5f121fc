"""The line at a glance: throughput, automation, defect Pareto, review backlog, estimated escape
rate and the champion; the panel refreshes itself without reloading the page."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from kensa.serving.console.charts import pareto, sparkline
from kensa.serving.console.context import Console, console_of
from kensa.serving.console.linestats import WINDOWS_MIN, line_stats
from kensa.serving.console.web import ConsoleError
from kensa.store.models import utcnow

router = APIRouter()

MinutesQuery = Query(60, description="Window in minutes: one of 15, 60, 480, 1440.")
LineQuery = Query(None, max_length=255)
RefreshQuery = Query(10, ge=1, le=300, description="Seconds between panel refreshes.")


def _panel(console: Console, line: str | None, minutes: int) -> dict[str, Any]:
    if minutes not in WINDOWS_MIN:
        allowed = ", ".join(str(m) for m in WINDOWS_MIN)
        raise ConsoleError(422, "invalid_window", f"minutes={minutes} is not one of {allowed}")
    with console.sessions() as session:
        stats = line_stats(session, line_id=line or None, minutes=minutes)
    return {
        "stats": stats,
        "spark": sparkline(stats.series),
        "pareto_data": pareto([(row.defect, row.total) for row in stats.pareto]),
        "model": console.current_model(),
        "line": line or None,
        "minutes": minutes,
        "generated": utcnow(),
    }


@router.get("/line")
def line_page(
    request: Request, line: str | None = LineQuery, minutes: int = MinutesQuery, refresh: int = RefreshQuery
) -> Response:
    console = console_of(request)
    context = _panel(console, line, minutes)
    return console.pages.render(
        request, "line.html", {"nav": "line", "windows": WINDOWS_MIN, "refresh": refresh, **context}
    )


@router.get("/line/panel")
def line_panel(request: Request, line: str | None = LineQuery, minutes: int = MinutesQuery) -> Response:
    """The page's live part as an HTML fragment (what the page's script swaps in)."""
    console = console_of(request)
    return console.pages.fragment(request, "_line_panel.html", _panel(console, line, minutes))
