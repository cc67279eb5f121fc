"""API keys: issue, revoke and check them; the store keeps only their SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from kensa.store.models import ROLES, ApiKey, utcnow

__all__ = [
    "KEY_PREFIX",
    "ROLES",
    "UnknownKeyError",
    "authenticate",
    "create_key",
    "hash_key",
    "revoke_key",
]

# Every key starts with this, so a leaked key is recognisable in logs and secret scanners.
KEY_PREFIX = "kensa_"
# Characters shown to people (and used for the indexed lookup): "kensa_" + 8 random characters,
# about 48 bits that narrow the lookup to one row while leaving ~208 secret bits.
_VISIBLE_CHARS = len(KEY_PREFIX) + 8
# Bytes of randomness in a key (256 bits).
_TOKEN_BYTES = 32
# Keys are long random strings; anything much longer is not a kensa key.
_MAX_KEY_CHARS = 128
# last_used_at is for people ("is this key still in use?"); writing it on every request would
# turn each authenticated read into a write.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


class UnknownKeyError(LookupError):
    """No API key with the given id exists."""


def hash_key(plaintext: str) -> str:
    """The stored form of a key: hex SHA-256 (keys are 256-bit random, so no salt is needed)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str, role: str) -> tuple[str, ApiKey]:
    """Issue a key for ``role``; returns the plaintext (shown once, never stored) and the row.

    The row is flushed, not committed: the caller commits (together with an audit event).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; accepted roles: {', '.join(ROLES)}")
    if not name.strip():
        raise ValueError("an API key needs a non-empty name saying who or what uses it")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
    row = ApiKey(
        name=name.strip(),
        role=role,
        prefix=plaintext[:_VISIBLE_CHARS],
        key_hash=hash_key(plaintext),
    )
    session.add(row)
    session.flush()
    return plaintext, row


def revoke_key(session: Session, key_id: int) -> ApiKey:
    """Revoke a key for good; revoking twice keeps the first revocation time. Caller commits."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise UnknownKeyError(f"no API key with id {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The active key matching ``plaintext``, or None (unknown, malformed or revoked).

    The hash comparison is constant-time. On success ``last_used_at`` is refreshed (at most once
    a minute); commit the session to keep it.
    """
    if (
        not isinstance(plaintext, str)
        or not plaintext.startswith(KEY_PREFIX)
        or len(plaintext) > _MAX_KEY_CHARS
    ):
        return None
    presented = hash_key(plaintext)
    candidates = session.scalars(select(ApiKey).where(ApiKey.prefix == plaintext[:_VISIBLE_CHARS])).all()
    match: ApiKey | None = None
    for row in candidates:
        if hmac.compare_digest(row.key_hash, presented):
            match = row
    if match is None or match.revoked_at is not None:
        return None
    now = utcnow()
    if match.last_used_at is None or now - match.last_used_at >= _LAST_USED_RESOLUTION:
        match.last_used_at = now
        session.flush()
    return match
