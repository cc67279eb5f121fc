"""Console sessions: a signed, HttpOnly, SameSite=Strict cookie naming the signed-in key, and its
CSRF token.

The cookie holds the key's id, name and role and a random CSRF token, signed with
``Settings.session_secret`` (itsdangerous, timestamped); never the API key itself. Every request
re-checks that the key is still active, so revoking a key ends its console sessions at once.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response

from kensa.store.models import ApiKey

COOKIE_NAME = "kensa_console"
COOKIE_PATH = "/console"
# One shift: a session older than this must sign in again.
MAX_AGE_S = 8 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class ConsoleUser:
    """The person behind a console session; ``name`` is the API key's name (who they are)."""

    key_id: int
    name: str
    role: str

    @property
    def actor(self) -> str:
        """How the audit trail names them: the person, as the key's name says."""
        return self.name


@dataclass(frozen=True)
class ConsoleSession:
    """What the cookie carries: a CSRF token always, a user once signed in, one flash message."""

    csrf: str
    user: ConsoleUser | None = None
    flash: tuple[str, str] | None = None  # (kind, message): shown once on the next page
    issued: float = field(default_factory=time.time)

    @classmethod
    def anonymous(cls) -> ConsoleSession:
        return cls(csrf=secrets.token_urlsafe(24))

    @classmethod
    def signed_in(cls, user: ConsoleUser) -> ConsoleSession:
        # A fresh token at sign-in: a token seen before sign-in is worth nothing after it.
        return cls(csrf=secrets.token_urlsafe(24), user=user)

    def with_flash(self, kind: str, message: str) -> ConsoleSession:
        return replace(self, flash=(kind, message[:500]))

    def without_flash(self) -> ConsoleSession:
        return replace(self, flash=None)

    def csrf_matches(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf.encode(), str(presented).encode())


class SessionCodec:
    """Signs sessions into cookie values and reads them back (``None`` for bad or stale ones)."""

    def __init__(self, secret: str) -> None:
        if not secret:
            # No configured secret: sessions last as long as this process (and this replica).
            secret = secrets.token_urlsafe(32)
        self._serializer = URLSafeTimedSerializer(secret, salt="kensa-console-session")

    def dumps(self, session: ConsoleSession) -> str:
        data: dict[str, Any] = {"c": session.csrf, "i": session.issued}
        if session.user is not None:
            data["u"] = [session.user.key_id, session.user.name, session.user.role]
        if session.flash is not None:
            data["f"] = list(session.flash)
        return str(self._serializer.dumps(data))

    def loads(self, value: str | None) -> ConsoleSession | None:
        if not value or len(value) > 4096:
            return None
        try:
            data = self._serializer.loads(value, max_age=MAX_AGE_S)
        except (BadSignature, SignatureExpired):
            return None
        try:
            user = None
            if "u" in data:
                key_id, name, role = data["u"]
                user = ConsoleUser(int(key_id), str(name), str(role))
            flash = tuple(data["f"]) if "f" in data else None
            return ConsoleSession(
                csrf=str(data["c"]),
                user=user,
                flash=(str(flash[0]), str(flash[1])) if flash else None,
                issued=float(data.get("i", 0.0)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def write(self, response: Response, session: ConsoleSession, *, secure: bool) -> None:
        response.set_cookie(
            COOKIE_NAME,
            self.dumps(session),
            max_age=MAX_AGE_S,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=secure,
        )

    @staticmethod
    def clear(response: Response, *, secure: bool) -> None:
        response.delete_cookie(COOKIE_NAME, path=COOKIE_PATH, httponly=True, samesite="strict", secure=secure)


def key_is_active(sessions: sessionmaker[Session], user: ConsoleUser) -> bool:
    """Whether the session's key still exists, is not revoked and has the same role.

    Asked on every console request (a primary-key read; people make few requests), so a revoked
    key's sessions stop at once instead of living on until the cookie expires.
    """
    with sessions() as session:
        row = session.get(ApiKey, user.key_id)
        return row is not None and row.revoked_at is None and row.role == user.role
