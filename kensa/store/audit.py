"""Tamper-evident audit trail: events appended as a SHA-256 hash chain anyone can re-check.

The recipe, so a third party can verify the trail with nothing but SQL, JSON and SHA-256:

* Rows are read in ``id`` order. The first row's ``prev_hash`` is ``GENESIS_HASH`` (64 zeros);
  every later row's ``prev_hash`` is the ``hash`` of the row before it.
* ``hash = sha256_hex(utf8(prev_hash + canonical))`` where ``canonical`` is the JSON object
  ``{"action", "actor", "created_at", "details", "subject"}`` with keys sorted, separators
  ``","`` and ``":"``, non-ASCII characters kept as UTF-8, and ``created_at`` written as
  ISO 8601 in UTC with microseconds (``2025-01-31T08:15:00.123456+00:00``).

Changing any stored field of a row breaks that row's hash; deleting or reordering rows breaks the
next row's ``prev_hash``. Deleting the newest rows leaves a valid, shorter chain: compare
``head_hash`` with a copy kept elsewhere (``verify_chain(..., expected_head=...)``) to catch that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from kensa.store.models import AuditEvent, utcnow

GENESIS_HASH = "0" * 64

# PostgreSQL advisory lock key ("audit" in ASCII): appenders take turns reading the chain head.
_AUDIT_LOCK_KEY = 0x6175646974


@dataclass(frozen=True)
class ChainProblem:
    """One place where the stored audit trail does not match its hash chain."""

    event_id: int | None
    problem: str

    def __str__(self) -> str:
        where = f"audit event {self.event_id}" if self.event_id is not None else "audit trail"
        return f"{where}: {self.problem}"


def canonical_json(value: Any) -> str:
    """The one JSON spelling of ``value`` that is hashed (sorted keys, no spaces, no NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(
    prev_hash: str,
    *,
    created_at: datetime,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, Any],
) -> str:
    """The hash a row with these fields must carry, given the hash of the row before it."""
    canonical = canonical_json(
        {
            "action": action,
            "actor": actor,
            "created_at": _timestamp(created_at),
            "details": details,
            "subject": subject,
        }
    )
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


def _lock_chain(session: Session) -> None:
    # Two writers that read the same head would both try to link to it. Take the database's
    # write lock before reading the head so appenders queue up (held until the caller commits).
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _AUDIT_LOCK_KEY})
    else:
        # SQLite has one write lock per file; a DML statement that changes nothing acquires it
        # (and, if it starts the transaction, does so on the newest snapshot).
        session.execute(text("DELETE FROM audit_events WHERE 1 = 0"))


def head_hash(session: Session) -> str:
    """Hash of the newest event (``GENESIS_HASH`` for an empty trail); keep copies elsewhere."""
    latest = session.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
    return latest if latest is not None else GENESIS_HASH


def append_event(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the trail and flush it; the caller commits.

    ``actor`` is who did it (a user, an API key name, a flow), ``action`` what (``model.promote``),
    ``subject`` what it was done to (``model:kensa-qc/3``). ``details`` must be JSON-serialisable.
    """
    for name, value in (("actor", actor), ("action", action), ("subject", subject)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"audit event {name} must be a non-empty string; got {value!r}")
    try:
        # Store exactly what was hashed: tuples become lists, keys become strings, and so on.
        stored_details: dict[str, Any] = json.loads(canonical_json(dict(details or {})))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit event details must be JSON-serialisable: {exc}") from exc

    _lock_chain(session)
    prev_hash = head_hash(session)
    created_at = utcnow()
    event = AuditEvent(
        created_at=created_at,
        actor=actor,
        action=action,
        subject=subject,
        details=stored_details,
        prev_hash=prev_hash,
        hash=event_hash(
            prev_hash,
            created_at=created_at,
            actor=actor,
            action=action,
            subject=subject,
            details=stored_details,
        ),
    )
    session.add(event)
    session.flush()
    return event


def verify_chain(session: Session, *, expected_head: str | None = None) -> list[ChainProblem]:
    """Re-check every stored event against the chain; an empty list means the trail is intact.

    ``expected_head``: a head hash recorded earlier (see ``head_hash``); if given, the trail must
    still contain it, which catches deleted newest events.
    """
    problems: list[ChainProblem] = []
    expected_prev = GENESIS_HASH
    seen_expected_head = expected_head is None or expected_head == GENESIS_HASH
    # populate_existing: compare what the database holds now, not objects cached in the session.
    rows = session.scalars(
        select(AuditEvent).order_by(AuditEvent.id).execution_options(yield_per=500, populate_existing=True)
    )
    for event in rows:
        if event.prev_hash != expected_prev:
            problems.append(
                ChainProblem(
                    event.id,
                    "prev_hash does not match the previous event's hash "
                    "(an event before it was deleted, inserted or reordered)",
                )
            )
        recomputed = event_hash(
            event.prev_hash,
            created_at=event.created_at,
            actor=event.actor,
            action=event.action,
            subject=event.subject,
            details=event.details,
        )
        if recomputed != event.hash:
            problems.append(ChainProblem(event.id, "content does not match its hash (changed after writing)"))
        if event.hash == expected_head:
            seen_expected_head = True
        # Continue from the stored hash so one tampered row is reported once, not for every
        # row after it.
        expected_prev = event.hash
    if not seen_expected_head:
        problems.append(ChainProblem(None, f"expected head {expected_head} is missing (events were removed)"))
    return problems
