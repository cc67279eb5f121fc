"""What the console's pages share: the Jinja environment (autoescaped), rendering, redirects with a
one-time message, the signed-in user, and the console's error type."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import RedirectResponse, Response

from kensa.serving.console.session import CSRF_FIELD, ConsoleSession, ConsoleUser, SessionCodec
from kensa.serving.security.auth import CONSOLE_PREFIX
from kensa.settings import Settings

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"


class ConsoleError(Exception):
    """A request the console refuses: status, stable code, and a message for the person."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def _age(value: datetime | None, now: datetime | None = None) -> str:
    """'3 min', '2 h 5 min', '4 d': how long ago, for people scanning a list."""
    if value is None:
        return "—"
    seconds = max(0, int(((now or datetime.now(UTC)) - value).total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f} %"


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,  # every value is escaped, whatever the file's extension
        undefined=jinja2.StrictUndefined,  # a typo in a template fails the test, not the page
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = _age
    env.filters["when"] = _when
    env.filters["pct"] = _pct
    env.globals["prefix"] = CONSOLE_PREFIX
    env.globals["csrf_field"] = CSRF_FIELD
    return Jinja2Templates(env=env)


def session_of(request: Request) -> ConsoleSession:
    found: ConsoleSession | None = request.scope.get("state", {}).get("console_session")
    return found or ConsoleSession.anonymous()


def user_of(request: Request) -> ConsoleUser:
    found: ConsoleUser | None = request.scope.get("state", {}).get("console_user")
    if found is None:  # the guard sets it on every non-public route
        raise ConsoleError(401, "not_signed_in", f"sign in at {CONSOLE_PREFIX}/login first")
    return found


def is_secure(request: Request) -> bool:
    return request.url.scheme == "https"


class Pages:
    """Renders pages and redirects, keeping the session cookie in step."""

    def __init__(self, settings: Settings, codec: SessionCodec) -> None:
        self.settings = settings
        self.codec = codec
        self.templates = make_templates()

    def render(self, request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        session = session_of(request)
        ctx = {
            "user": request.scope.get("state", {}).get("console_user"),
            "csrf": session.csrf,
            "flash": session.flash,
            "nav": context.pop("nav", ""),
            **context,
        }
        response = self.templates.TemplateResponse(request, name, ctx, status_code=status)
        if session.flash is not None or request.scope.get("state", {}).get("console_session") is None:
            # Shown once: clear the message; or start a session so the page's forms get a token.
            self.codec.write(response, session.without_flash(), secure=is_secure(request))
        return response

    def fragment(self, request: Request, name: str, context: dict[str, Any]) -> Response:
        return self.templates.TemplateResponse(request, name, context)

    def redirect(self, request: Request, url: str, flash: tuple[str, str] | None = None) -> Response:
        """Post/redirect/get: 303 to ``url``, with a message shown once on that page."""
        response = RedirectResponse(url, status_code=303)
        if flash is not None:
            session = session_of(request).with_flash(*flash)
            self.codec.write(response, session, secure=is_secure(request))
        return response

    def error_page(self, request: Request, status: int, code: str, detail: str) -> Response:
        return self.render(request, "error.html", {"status": status, "code": code, "detail": detail}, status)
