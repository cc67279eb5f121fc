"""The console's gate: who may open which page (CONSOLE_POLICY, deny-by-default), the session
cookie, the CSRF check on every state-changing request, and the security headers of every answer.

It runs before any console route, so a route added without a policy entry is closed and no form
handler can run without a valid CSRF token, whatever the handler does or forgets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, quote

from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kensa.serving.console.session import (
    COOKIE_NAME,
    CSRF_FIELD,
    CSRF_HEADER,
    ConsoleSession,
    SessionCodec,
    key_is_active,
)
from kensa.serving.security.auth import CONSOLE_POLICY, CONSOLE_PREFIX, CONSOLE_PUBLIC

log = logging.getLogger("kensa.serving.console")

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Console forms carry a label, a reason or a comment: a few KiB at most.
MAX_FORM_BYTES = 64 * 1024

# Pages only load what the console itself serves: no inline script, no third-party anything.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)

ErrorRenderer = Callable[[Scope, int, str, str], Response]


def console_template(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The full path template (``/console/...``) of the console route matching ``scope``."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.FULL:
            continue
        if isinstance(route, Mount):
            return f"{CONSOLE_PREFIX}{route.path}/{{path:path}}"
        path = str(getattr(route, "path", ""))
        return CONSOLE_PREFIX if path in ("", "/") else CONSOLE_PREFIX + path
    return None


def wants_html(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"accept":
            return b"text/html" in value
    return False


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return value.decode("latin-1")
    return None


def safe_next(path: str | None) -> str:
    """Where to go after sign-in: a console path only (never another site)."""
    if path and path.startswith(CONSOLE_PREFIX + "/") and not path.startswith("//") and "\\" not in path:
        return path
    return CONSOLE_PREFIX + "/"


class ConsoleGuard:
    """ASGI middleware of the console sub-app (see the module docstring).

    ``routes`` are the declared routes (their templates key CONSOLE_POLICY); ``app_routes`` are all
    routes the app would dispatch to, so one added without a policy is found and denied.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: list[BaseRoute],
        app_routes: list[BaseRoute],
        codec: SessionCodec,
        sessions: sessionmaker[Session],
        render_error: ErrorRenderer,
    ) -> None:
        self.app = app
        self.routes = routes
        self.app_routes = app_routes
        self.codec = codec
        self.sessions = sessions
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_headers(send)
        session = self._session(scope)
        state = scope.setdefault("state", {})
        state["console_session"] = session
        template = console_template(self.routes, scope)
        if template is None:
            if not any(r.matches(scope)[0] == Match.FULL for r in self.app_routes):
                await self.app(scope, receive, send)  # 404 or 405: nothing is exposed
                return
            template = f"{scope['path']} (undeclared console route)"  # no policy: denied below
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        public = (method, template) in CONSOLE_PUBLIC
        if not public:
            user = session.user if session else None
            if user is None or not await asyncio.to_thread(key_is_active, self.sessions, user):
                await self._sign_in_first(scope, receive, send, revoked=user is not None)
                return
            allowed = CONSOLE_POLICY.get((method, template))
            if allowed is None or user.role not in allowed:
                who = ", ".join(sorted(allowed)) if allowed else "no role (this page has no policy)"
                log.info(
                    "console_forbidden", extra={"key_id": user.key_id, "role": user.role, "route": template}
                )
                detail = f"role '{user.role}' may not {method} {template}; allowed: {who}"
                await self.render_error(scope, 403, "forbidden", detail)(scope, receive, send)
                return
            state["console_user"] = user
        if method in UNSAFE_METHODS:
            checked = await self._check_csrf(scope, receive, send, session)
            if checked is None:
                return
            receive = checked
        await self.app(scope, receive, send)

    def _session(self, scope: Scope) -> ConsoleSession | None:
        raw = _header(scope, b"cookie")
        if not raw:
            return None
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(raw)
        except Exception:  # a malformed Cookie header is no session, not an error
            return None
        morsel = cookie.get(COOKIE_NAME)
        return self.codec.loads(morsel.value) if morsel else None

    async def _sign_in_first(self, scope: Scope, receive: Receive, send: Send, *, revoked: bool) -> None:
        secure = scope.get("scheme") == "https"
        if scope["method"] in ("GET", "HEAD") and wants_html(scope):
            target = scope["path"] + (
                f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
            )
            location = f"{CONSOLE_PREFIX}/login?next={quote(safe_next(target), safe='')}"
            if revoked:
                location += "&expired=1"
            response: Response = Response(status_code=303, headers={"location": location})
        else:
            detail = (
                "this console session's API key was revoked; sign in with an active key"
                if revoked
                else f"sign in at {CONSOLE_PREFIX}/login first "
                "(the console uses a session cookie, not a bearer key)"
            )
            response = self.render_error(scope, 401, "not_signed_in", detail)
        if revoked:
            SessionCodec.clear(response, secure=secure)
        await response(scope, receive, send)

    async def _check_csrf(
        self, scope: Scope, receive: Receive, send: Send, session: ConsoleSession | None
    ) -> Receive | None:
        """Read the (small) body, check its token, and hand the same body on; None = refused."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_FORM_BYTES:
                detail = f"a console form may carry at most {MAX_FORM_BYTES // 1024} KiB"
                await self.render_error(scope, 413, "form_too_large", detail)(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        presented = _header(scope, CSRF_HEADER.encode())
        media = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if presented is None and media == "application/x-www-form-urlencoded":
            values = parse_qs(body.decode("utf-8", "replace"), max_num_fields=64).get(CSRF_FIELD)
            presented = values[0] if values else None
        if session is None or not session.csrf_matches(presented):
            log.info("console_csrf_refused", extra={"path": scope["path"]})
            detail = (
                "this form did not carry the console's CSRF token for your session; "
                "reload the page and send it again"
            )
            await self.render_error(scope, 403, "csrf_failed", detail)(scope, receive, send)
            return None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS:
                    if name not in present:
                        headers.append((name, value))
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                    headers.append((b"x-frame-options", b"DENY"))
                message = {**message, "headers": headers}
            await send(message)

        return add_headers


def json_error(status: int, code: str, detail: str) -> Response:
    return Response(
        json.dumps({"error": code, "detail": detail}), status_code=status, media_type="application/json"
    )
