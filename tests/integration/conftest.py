"""Fixtures for integration tests: a real PostgreSQL, one throwaway database per use."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

# Where the test PostgreSQL lives (trust auth); KENSA_TEST_PG_URL replaces these, e.g. in CI.
_DEFAULT_ADMIN_URLS = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
)


def _services_required() -> bool:
    # CI sets this so a missing server fails the run instead of silently skipping it.
    return os.environ.get("KENSA_REQUIRE_SERVICES") == "1"


def _connect_admin() -> tuple[Engine | None, list[str]]:
    override = os.environ.get("KENSA_TEST_PG_URL")
    candidates = [override] if override else list(_DEFAULT_ADMIN_URLS)
    errors: list[str] = []
    for url in candidates:
        # AUTOCOMMIT: CREATE/DROP DATABASE cannot run inside a transaction.
        engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as exc:
            engine.dispose()
            first_line = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            errors.append(f"{make_url(url).render_as_string(hide_password=True)}: {first_line}")
            continue
        return engine, errors
    return None, errors


@pytest.fixture(scope="session")
def pg_admin_engine() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the maintenance database ``test``; skips if PostgreSQL is down."""
    engine, errors = _connect_admin()
    if engine is None:
        reason = "PostgreSQL is not reachable (" + "; ".join(errors) + ")"
        if _services_required():
            pytest.fail(f"KENSA_REQUIRE_SERVICES=1 but {reason}")
        pytest.skip(reason)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def make_pg_database(pg_admin_engine: Engine) -> Iterator[Callable[[], str]]:
    """Factory: create an empty database ``kensa_test_<hex>`` and return its URL.

    Every database made in the session is dropped at its end (FORCE ends leftover connections).
    """
    created: list[str] = []

    def make() -> str:
        name = f"kensa_test_{secrets.token_hex(6)}"
        with pg_admin_engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return pg_admin_engine.url.set(database=name).render_as_string(hide_password=False)

    yield make
    with pg_admin_engine.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_url(make_pg_database: Callable[[], str]) -> str:
    """URL of this test session's own PostgreSQL database (shared by the session's tests)."""
    return make_pg_database()


@pytest.fixture
def fresh_pg_url(make_pg_database: Callable[[], str]) -> str:
    """URL of a new, empty PostgreSQL database for one test."""
    return make_pg_database()
