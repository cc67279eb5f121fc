"""Who may call what: bearer API keys checked against the store, and one explicit role policy table.

A route that has no entry in ``POLICY`` (and is not in ``PUBLIC``) is denied, so a route added
without a decision about who may call it is closed, not open. Keys are never logged: log lines
name the key's id and name, never the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from kensa.serving.errors import send_error
from kensa.store.keys import authenticate
from kensa.store.models import ROLES

log = logging.getLogger("kensa.serving.auth")

ALL_ROLES = frozenset(ROLES)
WRITERS = frozenset({"line", "admin"})  # calls that judge parts and log predictions
READERS = frozenset({"operator", "data-scientist", "auditor", "admin"})

# Health checks are for load balancers and orchestrators, which carry no key.
PUBLIC: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/v2/health/live"),
        ("GET", "/v2/health/ready"),
    }
)

# (method, route template) -> roles allowed. Every other route is denied.
POLICY: dict[tuple[str, str], frozenset[str]] = {
    ("POST", "/v1/inspect"): WRITERS,
    ("POST", "/v1/inspect/batch"): WRITERS,
    ("POST", "/v2/models/{name}/infer"): WRITERS,
    ("GET", "/v2"): ALL_ROLES,
    ("GET", "/v2/models/{name}"): ALL_ROLES,
    ("GET", "/v2/models/{name}/ready"): ALL_ROLES,
    ("GET", "/metrics"): READERS,
    ("GET", "/admin/model"): READERS,
    ("POST", "/admin/reload"): frozenset({"admin"}),
    ("GET", "/openapi.json"): ALL_ROLES,
}

# The operator console (serving/console) is for people: they sign in once with an API key and then
# carry a signed session cookie, so its routes are checked by the console's own guard against the
# tables below, deny-by-default like POLICY. AuthMiddleware leaves this prefix to that guard: a
# bearer key is never accepted there, and the console cookie is accepted nowhere else (so no API
# route can be driven by a forged cross-site form).
CONSOLE_PREFIX = "/console"
PEOPLE = READERS  # every role but the machine role "line" may sign in to the console
LABELLERS = frozenset({"operator", "data-scientist", "admin"})
ALERT_HANDLERS = frozenset({"operator", "data-scientist", "admin"})
# May press approve/reject/rollback; the project's [approval] policy then decides (roles, two-person).
DECIDERS = frozenset({"operator", "data-scientist", "admin"})

CONSOLE_PUBLIC: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/console/login"),
        ("POST", "/console/login"),
        ("GET", "/console/static/{path:path}"),
    }
)

CONSOLE_POLICY: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/console"): PEOPLE,
    ("POST", "/console/logout"): PEOPLE,
    ("GET", "/console/review"): READERS,
    ("GET", "/console/review/{item_id}/image"): READERS,
    ("GET", "/console/review/{item_id}/heatmap.png"): READERS,
    ("POST", "/console/review/{item_id}/label"): LABELLERS,
    ("GET", "/console/alerts"): READERS,
    ("GET", "/console/alerts/{alert_id}"): READERS,
    ("GET", "/console/alerts/{alert_id}/report"): READERS,
    ("POST", "/console/alerts/{alert_id}/acknowledge"): ALERT_HANDLERS,
    ("POST", "/console/alerts/{alert_id}/escalate"): ALERT_HANDLERS,
    ("POST", "/console/alerts/{alert_id}/resolve"): ALERT_HANDLERS,
    ("GET", "/console/models"): READERS,
    ("GET", "/console/models/compare"): READERS,
    ("GET", "/console/models/{version}"): READERS,
    ("GET", "/console/models/{version}/artifacts/{path:path}"): READERS,
    ("POST", "/console/models/{version}/approve"): DECIDERS,
    ("POST", "/console/models/{version}/reject"): DECIDERS,
    ("POST", "/console/models/rollback"): DECIDERS,
    ("GET", "/console/line"): READERS,
    ("GET", "/console/line/panel"): READERS,
}


def is_console_path(path: str) -> bool:
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


# How long an authenticated key is trusted without asking the store again (seconds). A revoked
# key stops working within this time; a lookup per request would put the store on the hot path.
KEY_CACHE_S = 10.0


@dataclass(frozen=True)
class Principal:
    """The caller behind a key."""

    key_id: int
    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}:{self.name}"


class KeyCache:
    """Authenticated keys by SHA-256 for ``KEY_CACHE_S``; unknown keys always ask the store."""

    def __init__(self, sessions: sessionmaker[Session], ttl_s: float = KEY_CACHE_S) -> None:
        self._sessions = sessions
        self._ttl = ttl_s
        self._entries: dict[str, tuple[Principal, float]] = {}

    def _lookup(self, plaintext: str) -> Principal | None:
        with self._sessions() as session:
            row = authenticate(session, plaintext)
            if row is None:
                return None
            principal = Principal(row.id, row.name, row.role)
            session.commit()  # keeps last_used_at
            return principal

    async def principal(self, plaintext: str) -> Principal | None:
        digest = hashlib.sha256(plaintext.encode("utf-8", "replace")).hexdigest()
        hit = self._entries.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = await asyncio.to_thread(self._lookup, plaintext)
        if principal is None:
            self._entries.pop(digest, None)
            return None
        if len(self._entries) > 10_000:  # bound memory against key churn
            self._entries.clear()
        self._entries[digest] = (principal, now + self._ttl)
        return principal


def route_template(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The path template of the route that fully matches ``scope`` (method included), if any."""
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", ""))
    return None


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


class AuthMiddleware:
    """Checks the key and the role before the request body is read (strangers cost nothing).

    ``routes`` are the declared routes (their templates key ``POLICY``); ``app_routes`` are all
    routes the app would dispatch to, so one added without a policy is found and denied.
    """

    def __init__(
        self, app: ASGIApp, *, routes: list[BaseRoute], app_routes: list[BaseRoute], keys: KeyCache
    ) -> None:
        self.app = app
        self.routes = routes
        self.app_routes = app_routes
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if is_console_path(scope["path"]):
            await self.app(scope, receive, send)  # the console's guard checks CONSOLE_POLICY
            return
        template = route_template(self.routes, scope)
        if template is None:
            if not any(r.matches(scope)[0] == Match.FULL for r in self.app_routes):
                await self.app(scope, receive, send)  # 404 or 405: nothing is exposed
                return
            template = f"{scope['path']} (undeclared route)"  # no policy: denied below
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        path = scope["path"]
        if (method, template) in PUBLIC:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if not token:
            detail = (
                "send an API key as 'Authorization: Bearer <key>'"
                if token is None
                else "the Authorization header must be 'Bearer <key>'"
            )
            await send_error(send, path, 401, "missing_api_key", detail, {"WWW-Authenticate": "Bearer"})
            return
        principal = await self.keys.principal(token)
        if principal is None:
            await send_error(
                send,
                path,
                401,
                "invalid_api_key",
                "the API key is unknown or revoked",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        allowed = POLICY.get((method, template))
        if allowed is None or principal.role not in allowed:
            who = ", ".join(sorted(allowed)) if allowed else "no role (this route has no policy)"
            log.info(
                "forbidden",
                extra={"key_id": principal.key_id, "role": principal.role, "route": template},
            )
            await send_error(
                send,
                path,
                403,
                "forbidden",
                f"role '{principal.role}' may not call {method} {template}; allowed: {who}",
            )
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
