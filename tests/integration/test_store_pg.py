"""The store's behaviour, checked the same way on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from kensa.store.audit import GENESIS_HASH, append_event, head_hash, verify_chain
from kensa.store.engine import make_engine, make_session_factory
from kensa.store.keys import authenticate, create_key, revoke_key
from kensa.store.migrate import alembic_config, current_revision, head_revision, upgrade
from kensa.store.models import (
    ApiKey,
    AuditEvent,
    Base,
    DriftResult,
    Prediction,
    ReviewItem,
)

TABLES = {
    "predictions",
    "review_items",
    "alerts",
    "audit_events",
    "api_keys",
    "cost_ledger",
    "drift_results",
}


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.integration),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store of each backend: a SQLite file in a folder that does not exist yet, or a
    new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'kensa.db'}"
    url: str = request.getfixturevalue("fresh_pg_url")
    return url


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    upgrade(store_url)
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def _prediction(request_id: str, **overrides: Any) -> Prediction:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "image_sha256": "ab" * 32,
        "model_name": "kensa-qc",
        "model_version": "3",
        "verdict": "defect",
        "defect_type": "defect_scratch",
        "probs": {"ok": 0.05, "defect_scratch": 0.95},
        "features": [0.25, -1.5, 3.0],
        "latency_ms": 4.2,
        "part_id": "P-0001",
        "line_id": "line-1",
        "camera_id": "cam-a",
    }
    fields.update(overrides)
    return Prediction(**fields)


def test_upgrade_builds_the_schema_of_the_models_and_is_idempotent(store_url: str) -> None:
    assert current_revision(store_url) is None

    first = upgrade(store_url)
    again = upgrade(store_url)

    assert (first.before, first.after) == (None, head_revision())
    assert not again.changed and again.after == head_revision()
    assert current_revision(store_url) == head_revision()
    engine = make_engine(store_url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            # The hand-written migration and the ORM models describe the same schema.
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_the_schema_and_upgrade_rebuilds_it(store_url: str) -> None:
    upgrade(store_url)
    engine = make_engine(store_url)
    try:
        with engine.connect() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
            conn.commit()
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert current_revision(store_url) is None
    assert upgrade(store_url).after == head_revision()


def test_rows_round_trip_with_json_intact_and_utc_aware_timestamps(
    sessions: sessionmaker[Session],
) -> None:
    tokyo = timezone(timedelta(hours=9))
    start = datetime(2025, 3, 1, 9, 0, tzinfo=tokyo)
    with sessions() as session:
        session.add(_prediction("req-1"))
        session.add(
            DriftResult(
                line_id="line-1",
                window_size=500,
                window_start=start,
                window_end=start + timedelta(hours=1),
                score=0.31,
                level="warning",
                details={"psi": {"brightness": 0.4}},
            )
        )
        session.commit()

    with sessions() as session:
        prediction = session.scalars(select(Prediction)).one()
        drift = session.scalars(select(DriftResult)).one()

    assert prediction.probs == {"ok": 0.05, "defect_scratch": 0.95}
    assert prediction.features == [0.25, -1.5, 3.0]
    assert prediction.created_at.tzinfo is not None
    assert abs(datetime.now(UTC) - prediction.created_at) < timedelta(minutes=1)
    # Same instant, handed back in UTC.
    assert drift.window_start == start
    assert drift.window_start.utcoffset() == timedelta(0)
    assert drift.window_start.hour == 0
    assert drift.details == {"psi": {"brightness": 0.4}}


def test_naive_datetimes_are_refused(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        session.add(
            DriftResult(
                line_id="line-1",
                window_size=10,
                window_start=datetime(2025, 1, 1),
                window_end=datetime(2025, 1, 2),
                score=0.0,
                level="none",
            )
        )
        with pytest.raises(StatementError, match="naive datetime"):
            session.flush()


@pytest.mark.parametrize(
    "bad_rows",
    [
        pytest.param(lambda: [_prediction("dup"), _prediction("dup")], id="duplicate-request-id"),
        pytest.param(
            lambda: [
                _prediction("a", idempotency_key="retry-1"),
                _prediction("b", idempotency_key="retry-1"),
            ],
            id="duplicate-idempotency-key",
        ),
        pytest.param(lambda: [_prediction("x", verdict="maybe")], id="unknown-verdict"),
        pytest.param(
            lambda: [
                ReviewItem(
                    prediction_id=987654,
                    image_path="img.png",
                    reason="review_band",
                    model_name="kensa-qc",
                    model_version="3",
                    probs={"ok": 0.5},
                    line_id="line-1",
                )
            ],
            id="review-item-of-missing-prediction",
        ),
    ],
)
def test_database_refuses_inconsistent_rows(sessions: sessionmaker[Session], bad_rows: Any) -> None:
    with sessions() as session:
        for row in bad_rows():
            session.add(row)
            # Flush one at a time so the second duplicate is a separate INSERT.
            try:
                session.flush()
            except IntegrityError:
                return
    pytest.fail("the database accepted rows it should have refused")


def _append_three(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        append_event(
            session,
            actor="alice",
            action="model.approve",
            subject="model:kensa-qc/3",
            details={"note": "KPI gate passed", "escape_rate": 0.004},
        )
        append_event(
            session,
            actor="flow:promote",
            action="model.promote",
            subject="model:kensa-qc/3",
            details={"alias": "champion", "ids": (1, 2)},
        )
        append_event(
            session,
            actor="bob",
            action="alert.ack",
            subject="alert:7",
            details={"comment": "lens cleaned — ok"},
        )
        session.commit()


def test_audit_chain_verifies_and_a_changed_row_is_detected(
    sessions: sessionmaker[Session],
) -> None:
    _append_three(sessions)
    with sessions() as session:
        assert verify_chain(session) == []
        second = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()[1]
        assert second.details == {"alias": "champion", "ids": [1, 2]}
        session.execute(
            text("UPDATE audit_events SET details = :d WHERE id = :id"),
            {"d": json.dumps({"alias": "challenger", "ids": [1, 2]}), "id": second.id},
        )
        session.commit()

    with sessions() as session:
        problems = verify_chain(session)
    assert [p.event_id for p in problems] == [second.id]
    assert "changed" in str(problems[0])


def test_audit_chain_detects_deleted_events(sessions: sessionmaker[Session]) -> None:
    _append_three(sessions)
    with sessions() as session:
        head = head_hash(session)
        ids = session.scalars(select(AuditEvent.id).order_by(AuditEvent.id)).all()
        session.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[1]})
        session.commit()
        assert [p.event_id for p in verify_chain(session)] == [ids[2]]

        # Deleting the newest event leaves a valid chain; only a kept head hash reveals it.
        session.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[2]})
        session.commit()
        assert verify_chain(session) == []
        problems = verify_chain(session, expected_head=head)
    assert [p.event_id for p in problems] == [None]
    assert "missing" in str(problems[0])


def test_audit_trail_can_be_verified_without_kensa(engine: Engine, sessions: sessionmaker[Session]) -> None:
    """A third party recomputes the chain with plain SQL, json and hashlib (the documented
    recipe in kensa.store.audit), reading values the way its driver returns them."""
    _append_three(sessions)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT created_at, actor, action, subject, details, prev_hash, hash "
                "FROM audit_events ORDER BY id"
            )
        ).all()
    prev = "0" * 64
    for created_at, actor, action, subject, details, prev_hash, stored_hash in rows:
        if isinstance(created_at, str):  # SQLite keeps UTC as text without an offset
            created_at = datetime.fromisoformat(created_at)
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
        if isinstance(details, str):
            details = json.loads(details)
        canonical = json.dumps(
            {
                "action": action,
                "actor": actor,
                "created_at": created_at.astimezone(UTC).isoformat(timespec="microseconds"),
                "details": details,
                "subject": subject,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        assert prev_hash == prev
        assert hashlib.sha256((prev + canonical).encode()).hexdigest() == stored_hash
        prev = stored_hash
    assert len(rows) == 3


def test_concurrent_writers_extend_one_unbroken_chain(sessions: sessionmaker[Session]) -> None:
    writers, events_each = 4, 5
    errors: list[BaseException] = []
    start = threading.Barrier(writers)

    def write(writer: int) -> None:
        try:
            start.wait()
            for n in range(events_each):
                with sessions() as session:
                    append_event(session, actor=f"writer-{writer}", action="test.append", subject=f"n:{n}")
                    session.commit()
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == writers * events_each
        assert verify_chain(session) == []
        assert head_hash(session) != GENESIS_HASH


def test_api_keys_are_stored_hashed_and_revoked_keys_are_refused(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions() as session:
        plaintext, row = create_key(session, "line-1 camera gateway", "line")
        session.commit()
        key_id = row.id

    with engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM api_keys")).mappings().one()
    secret_part = plaintext[len(stored["prefix"]) :]
    assert all(secret_part not in str(value) for value in stored.values())
    assert plaintext.startswith(stored["prefix"])
    assert stored["key_hash"] == hashlib.sha256(plaintext.encode()).hexdigest()

    with sessions() as session:
        found = authenticate(session, plaintext)
        session.commit()
        assert found is not None and found.id == key_id and found.role == "line"
        assert found.last_used_at is not None
        wrong = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
        assert authenticate(session, wrong) is None
        assert authenticate(session, "") is None
        assert authenticate(session, stored["key_hash"]) is None

        revoke_key(session, key_id)
        session.commit()

    with sessions() as session:
        assert authenticate(session, plaintext) is None
        refreshed = session.get(ApiKey, key_id)
        assert refreshed is not None and refreshed.revoked_at is not None
