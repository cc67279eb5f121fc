"""Engines and sessions for the store: SQLite (embedded default, WAL) or PostgreSQL (production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

# How long a SQLite writer waits for another writer's lock before "database is locked" (ms).
# Serving, flows and the CLI may write to the same file at once; a few seconds absorbs that.
SQLITE_BUSY_TIMEOUT_MS = 5000

_POSTGRES_DRIVER = "postgresql+psycopg"


class StoreURLError(ValueError):
    """The store URL is malformed or names a database kensa does not support."""


def normalize_url(url: str) -> URL:
    """Parse a store URL, sending plain ``postgresql://`` (and ``postgres://``) to psycopg 3.

    Accepted: ``sqlite:///<path>``, ``sqlite://`` (in memory), ``postgresql[+psycopg]://...``.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        msg = f"store URL {url!r} is not a database URL; use sqlite:///<path> or postgresql://..."
        raise StoreURLError(msg) from exc
    # Only psycopg 3 is a dependency; SQLAlchemy's bare "postgresql" would load psycopg2.
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername=_POSTGRES_DRIVER)
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", _POSTGRES_DRIVER):
        msg = (
            f"store URL uses {parsed.drivername!r}; kensa's store runs on SQLite "
            "(sqlite:///<path>) or PostgreSQL (postgresql://... or postgresql+psycopg://...)"
        )
        raise StoreURLError(msg)
    return parsed


def display_url(url: str | URL) -> str:
    """The URL with its password masked, safe for logs and terminal output."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        # Echoing an unparseable URL could print a password verbatim.
        return "<unparseable URL>"


def sqlite_path(url: str | URL) -> Path | None:
    """The file behind a SQLite URL; None for PostgreSQL and for in-memory SQLite."""
    parsed = url if isinstance(url, URL) else normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers (the console, drift jobs) run while serving writes predictions.
        # The mode is stored in the file, so this only does work the first time.
        cursor.execute("PRAGMA journal_mode=WAL")
        # SQLite ignores FOREIGN KEY clauses unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # Safe with WAL (a crash may lose the last commits, never corrupt) and much faster.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create an engine for the store at ``url``.

    SQLite: the parent folder of the file is created, and every connection gets WAL mode,
    foreign keys and a busy timeout. PostgreSQL: psycopg 3, with connections checked before use
    so a restarted server does not surface as an error on the first request.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, echo=echo)
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    return create_engine(parsed, echo=echo, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit (no lazy reload)."""
    return sessionmaker(bind=engine, expire_on_commit=False)
