"""Sign in with an API key (it becomes a session cookie; the key itself is never stored), sign out."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import Response

from kensa.serving.console.context import Console, console_of
from kensa.serving.console.guard import safe_next
from kensa.serving.console.session import ConsoleSession, ConsoleUser, SessionCodec
from kensa.serving.console.web import is_secure, session_of, user_of
from kensa.serving.security.auth import CONSOLE_PREFIX, PEOPLE
from kensa.store.audit import append_event
from kensa.store.keys import authenticate

router = APIRouter()
log = logging.getLogger("kensa.serving.console")


def _check_key(console: Console, api_key: str) -> ConsoleUser | None:
    with console.sessions() as session:
        row = authenticate(session, api_key.strip())
        if row is None:
            return None
        user = ConsoleUser(row.id, row.name, row.role)
        if user.role in PEOPLE:
            append_event(
                session,
                actor=user.actor,
                action="console.sign_in",
                subject=f"key:{row.id}",
                details={"role": row.role},
            )
        session.commit()  # keeps last_used_at and the audit event
        return user


@router.get("/login")
def login_page(
    request: Request, next: str = Query(f"{CONSOLE_PREFIX}/", max_length=500), expired: int = 0
) -> Response:
    console = console_of(request)
    session = session_of(request)
    if session.user is not None and not expired:
        return console.pages.redirect(request, safe_next(next))
    message = "Your key was revoked or your session ended; sign in again." if expired else None
    return console.pages.render(request, "login.html", {"next": safe_next(next), "error": message})


@router.post("/login")
async def login(
    request: Request,
    api_key: str = Form("", max_length=256),
    next: str = Form(f"{CONSOLE_PREFIX}/", max_length=500),
) -> Response:
    console = console_of(request)
    target = safe_next(next)
    user = await asyncio.to_thread(_check_key, console, api_key) if api_key.strip() else None
    if user is None:
        log.info("console_sign_in_refused", extra={"reason": "unknown_or_revoked"})
        error = "That API key is unknown or has been revoked. Ask an admin for a key (kensa keys create)."
        return console.pages.render(request, "login.html", {"next": target, "error": error}, 401)
    if user.role not in PEOPLE:
        log.info(
            "console_sign_in_refused", extra={"reason": "role", "key_id": user.key_id, "role": user.role}
        )
        error = (
            f"A '{user.role}' key is for machines on the line; the console takes an operator, "
            "data-scientist, auditor or admin key."
        )
        return console.pages.render(request, "login.html", {"next": target, "error": error}, 403)
    log.info("console_sign_in", extra={"key_id": user.key_id, "role": user.role})
    response = console.pages.redirect(request, target)
    session = ConsoleSession.signed_in(user).with_flash("ok", f"Signed in as {user.name} ({user.role}).")
    console.pages.codec.write(response, session, secure=is_secure(request))
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    user = user_of(request)
    log.info("console_sign_out", extra={"key_id": user.key_id})
    response = console_of(request).pages.redirect(request, f"{CONSOLE_PREFIX}/login")
    SessionCodec.clear(response, secure=is_secure(request))
    return response


@router.get("/")
def home(request: Request) -> Response:
    """Labellers start at the review queue; everyone else at the line."""
    user = user_of(request)
    start = "review" if user.role in ("operator", "data-scientist") else "line"
    return console_of(request).pages.redirect(request, f"{CONSOLE_PREFIX}/{start}")
