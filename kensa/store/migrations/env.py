"""Alembic environment of the kensa store: runs migrations on a given connection or URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from kensa.store.engine import make_engine, normalize_url
from kensa.store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    # Order: `-x url=...` on the alembic command line, sqlalchemy.url in the ini, then settings.
    x_url = context.get_x_argument(as_dictionary=True).get("url")
    if x_url:
        return x_url
    ini_url = config.get_main_option("sqlalchemy.url")
    if ini_url:
        return ini_url
    # Only reached from the bare `alembic` command, which is an entry point of its own.
    from kensa.settings import Settings

    return Settings().resolved_store_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the SQL to stdout (``alembic upgrade --sql``) instead of running it."""
    context.configure(
        url=normalize_url(_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # kensa.store.migrate hands over an open connection so SQLite pragmas and locks apply.
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
