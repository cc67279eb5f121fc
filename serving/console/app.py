"""Builds the console sub-app and mounts it on the inference app at /console."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import Scope

from kensa.serving.console.context import Console, CurrentModel, DrawHeatmap, RefreshChampion
from kensa.serving.console.guard import ConsoleGuard, json_error, wants_html
from kensa.serving.console.pages import alerts, line, models, review, signin
from kensa.serving.console.session import SessionCodec
from kensa.serving.console.web import STATIC_DIR, ConsoleError, Pages
from kensa.serving.security.auth import CONSOLE_PREFIX
from kensa.settings import Settings

if TYPE_CHECKING:
    from kensa.serving.console.heatmap import Heatmap

log = logging.getLogger("kensa.serving.console")


async def _no_refresh(actor: str) -> str:
    return ""


def create_console(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    current_model: CurrentModel = lambda: None,
    refresh_champion: RefreshChampion = _no_refresh,
    draw_heatmap: DrawHeatmap | None = None,
) -> FastAPI:
    """The console as its own ASGI app (mount it at ``/console``)."""
    codec = SessionCodec(settings.session_secret)
    pages = Pages(settings, codec)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    console = Console(settings, sessions, pages, current_model, refresh_champion)
    if draw_heatmap is not None:
        console.draw_heatmap = draw_heatmap
    app.state.console = console
    pages_modules = (signin, review, alerts, models, line)
    for module in pages_modules:
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def render_error(scope: Scope, status: int, code: str, detail: str) -> Response:
        if wants_html(scope):
            return pages.error_page(Request(scope), status, code, detail)
        return json_error(status, code, detail)

    def error(request: Request, status: int, code: str, detail: str) -> Response:
        return render_error(request.scope, status, code, detail)

    @app.exception_handler(ConsoleError)
    async def console_error(request: Request, exc: ConsoleError) -> Response:
        return error(request, exc.status, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()[:5]
        )
        return error(request, 422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = f"no console page {request.url.path[:200]!r}" if exc.status_code == 404 else str(exc.detail)
        return error(request, exc.status_code, code, detail)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("console_unhandled_error", extra={"path": request.url.path})
        return error(request, 500, "internal_error", "an internal error occurred; it was logged")

    # The routes as declared (FastAPI wraps included ones), for matching a request to its policy.
    declared = [r for module in pages_modules for r in module.router.routes]
    declared += [r for r in app.router.routes if isinstance(r, Mount)]
    app.add_middleware(
        ConsoleGuard,
        routes=declared,
        app_routes=app.router.routes,
        codec=codec,
        sessions=sessions,
        render_error=render_error,
    )
    return app


def mount_console(app: FastAPI, settings: Settings, sessions: sessionmaker[Session]) -> None:
    """Mount the console on the inference ``app``; it reads the model in service from it and, after
    an approval or rollback, asks it to look at the champion alias at once (hot swap)."""

    def current_model() -> dict[str, Any] | None:
        state = getattr(app.state, "kensa", None)
        model = state.models.current if state is not None else None
        return model.describe() if model is not None else None

    async def refresh_champion(actor: str) -> str:
        state = getattr(app.state, "kensa", None)
        if state is None:
            return "serving has not started; it will load the champion when it does"
        try:
            result = await state.models.check(actor=actor)
        except Exception as exc:  # registry unreachable: the poll will catch up
            log.warning("console_refresh_failed", extra={"error": type(exc).__name__})
            return "serving could not read the registry now; it will pick the champion up on its next poll"
        serving = result.serving.version if result.serving else None
        if result.status == "swapped":
            return f"serving now answers with version {serving}"
        if result.status == "refused":
            candidate = result.candidate.version if result.candidate else "?"
            return (
                f"serving refused version {candidate} ({result.reason}); still serving {serving or 'nothing'}"
            )
        if result.status == "unchanged":
            return f"serving answers with version {serving}"
        return ""

    # One heatmap at a time, in a worker thread: a person paging through the review queue takes
    # at most one core from the line, whose batches keep their own inference threads.
    one_at_a_time: list[asyncio.Semaphore] = []

    async def draw_heatmap(data: bytes) -> Heatmap:
        from kensa.serving.console.heatmap import check_model, draw

        state = getattr(app.state, "kensa", None)
        model = check_model(state.models.current if state is not None else None)
        if not one_at_a_time:
            one_at_a_time.append(asyncio.Semaphore(1))
        async with one_at_a_time[0]:
            return await asyncio.to_thread(draw, model, data, settings.max_pixels)

    app.mount(
        CONSOLE_PREFIX,
        create_console(
            settings,
            sessions,
            current_model=current_model,
            refresh_champion=refresh_champion,
            draw_heatmap=draw_heatmap,
        ),
    )
