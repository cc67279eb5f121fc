"""The FastAPI app of the inference service: ``create_app(settings, ...)`` wires every part."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kensa import __version__
from kensa.logs import REQUEST_ID_HEADER, bound, new_request_id
from kensa.serving.console import mount_console
from kensa.serving.errors import ApiError, error_body
from kensa.serving.inference.predlog import ImageStore, PredictionLog
from kensa.serving.inference.service import InspectionService
from kensa.serving.inference.swap import FileSource, ModelManager, ModelSource, RegistrySource
from kensa.serving.metrics import Metrics
from kensa.serving.routes import admin, inspect, metrics, v2
from kensa.serving.security.auth import AuthMiddleware, KeyCache, route_template
from kensa.serving.security.limits import BodyLimitMiddleware
from kensa.serving.state import ServingState
from kensa.settings import Settings
from kensa.store.engine import make_engine, make_session_factory
from kensa.store.migrate import upgrade

log = logging.getLogger("kensa.serving.app")

# A caller's own X-Request-ID is logged beside ours (never used as a key) when it looks like an id.
_CALLER_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HEADER = REQUEST_ID_HEADER.encode()


class RequestIdMiddleware:
    """Gives every HTTP request an id: bound to its log lines (``kensa.logs.bound``), sent back as
    ``X-Request-ID``, and used by the inspection service as the verdicts' ``request_id``.

    The id is always ours (a caller could repeat theirs, and verdict ids are unique keys in the
    prediction log); a caller's ``X-Request-ID`` rides along in the log lines as ``client_request_id``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        fields = {"request_id": rid}
        for name, value in scope.get("headers", ()):
            if name == _HEADER and _CALLER_ID.fullmatch(value.decode("latin-1")):
                fields["client_request_id"] = value.decode("latin-1")
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                message = {**message, "headers": [*headers, (_HEADER, rid.encode())]}
            await send(message)

        with bound(**fields):
            await self.app(scope, receive, send_with_id)


class MetricsMiddleware:
    """Times every request by route template and counts error responses by status and code."""

    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute], metrics: Metrics) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and message.get("body"):
                try:
                    code = str(json.loads(message["body"]).get("error", "")).split(":", 1)[0]
                except (ValueError, AttributeError):
                    code = "unknown"
                self.metrics.errors.labels(str(status), code[:64]).inc()
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            template = route_template(self.routes, scope) or "unmatched"
            self.metrics.request_latency.labels(template).observe(time.perf_counter() - started)


def _error_response(
    request: Request, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, code, detail), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(request, exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()[:5]
        )
        return _error_response(request, 422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.url.path[:200]!r}; see /openapi.json for the routes"
        return _error_response(request, exc.status_code, code, detail, dict(exc.headers or {}) or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, never bad input: log it with the trace, tell the caller nothing internal. This
        # handler runs outside the request-id middleware, so the id comes from the request state.
        log.exception(
            "unhandled_error",
            extra={"request_id": getattr(request.state, "request_id", None), "path": request.url.path},
        )
        return _error_response(request, 500, "internal_error", "an internal error occurred; it was logged")


def make_source(settings: Settings, model_file: Path | None, registry_name: str | None) -> ModelSource:
    """A file source when a model file is given, else the registry's champion alias."""
    if model_file is not None:
        return FileSource(model_file)
    return RegistrySource(
        settings.resolved_mlflow_uri,
        registry_name or settings.registry_name,
        settings.data_dir / "serving" / "models",
    )


def create_app(
    settings: Settings,
    *,
    model_file: Path | None = None,
    registry_name: str | None = None,
    sessions: sessionmaker[Session] | None = None,
    migrate: bool = True,
) -> FastAPI:
    """The inference app: serves ``model_file``, or follows the champion of ``registry_name``
    (default ``settings.registry_name``). ``sessions`` replaces the store built from settings.
    """
    if sessions is None:
        if migrate:
            upgrade(settings.resolved_store_url)  # idempotent; PostgreSQL serialises replicas
        sessions = make_session_factory(make_engine(settings.resolved_store_url))
    metrics_ = Metrics()
    source = make_source(settings, model_file, registry_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models = ModelManager(
            source,
            sessions,
            metrics_,
            max_batch=settings.max_batch_size,
            cache_dir=settings.data_dir / "serving" / "trt-cache",
            runners=settings.inference_runners,
        )
        predlog = PredictionLog(sessions, ImageStore(settings.images_dir), settings.sample_rate)
        service = InspectionService(settings, models, predlog, metrics_)
        state = ServingState(settings, metrics_, models, service)
        app.state.kensa = state
        first = await models.check()
        if model_file is not None and first.status != "swapped":
            raise RuntimeError(f"cannot serve {model_file.name}: {first.reason or 'file not found'}")
        if first.serving is None:
            log.warning("no_model_at_start", extra={"status": first.status, "reason": first.reason})
        service.start()
        watcher = asyncio.create_task(models.watch(settings.champion_poll_s), name="kensa-champion-watch")
        try:
            yield
        finally:
            state.draining = True
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await service.stop()
            bind = sessions.kw.get("bind")
            if bind is not None:
                bind.dispose()

    app = FastAPI(
        title="kensa inference",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,  # the docs UI loads scripts from a CDN; the spec is enough
        description="Visual quality control verdicts. Every route but /v2/health/* needs "
        "'Authorization: Bearer <key>' (see `kensa keys create`).",
    )
    routers = (inspect.router, v2.router, admin.router, metrics.router)
    for router in routers:
        app.include_router(router)
    _install_error_handlers(app)
    mount_console(app, settings, sessions)  # /console: people, session cookies (serving.console.guard)
    # The routes as declared (FastAPI wraps included ones), for matching a request to its policy.
    routes: list[BaseRoute] = [r for router in routers for r in router.routes]
    routes += [r for r in app.router.routes if isinstance(r, Route)]
    # Added last = outermost: every log line of a request has its id; metrics see everything;
    # auth runs before the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, routes=routes, app_routes=app.router.routes, keys=KeyCache(sessions))
    app.add_middleware(MetricsMiddleware, routes=routes, metrics=metrics_)
    app.add_middleware(RequestIdMiddleware)
    return app
