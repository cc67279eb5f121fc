"""Bring a store's schema up to date with the Alembic migrations shipped inside the package."""

from __future__ import annotations

from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from kensa.store.engine import make_engine, sqlite_path

# A package resource, not a folder path: works from a checkout, a wheel or a zip, in any cwd.
SCRIPT_LOCATION = "kensa.store:migrations"

# PostgreSQL advisory lock key ("kensa" in ASCII) held while migrating, so replicas that all
# run `kensa db upgrade` on start-up take turns instead of racing to create the same tables.
_MIGRATION_LOCK_KEY = 0x6B656E7361


@dataclass(frozen=True)
class RevisionChange:
    """Schema revision before and after an upgrade (None: no kensa schema yet)."""

    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def alembic_config() -> Config:
    """An Alembic config for the packaged migrations, independent of the working directory."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def head_revision() -> str:
    """The newest revision shipped with this version of kensa."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships 0001
        raise RuntimeError("no migrations found in kensa.store:migrations")
    return head


def _revision_of(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def current_revision(url: str) -> str | None:
    """The revision the store at ``url`` is at; None when it has no kensa schema.

    A SQLite file that does not exist yet is reported as None without being created.
    """
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return _revision_of(connection)
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> RevisionChange:
    """Migrate the store at ``url`` to ``revision`` (default: the newest); a no-op when there.

    Raises ``alembic.util.CommandError`` for an unknown revision and
    ``sqlalchemy.exc.OperationalError`` when the database cannot be reached.
    """
    config = alembic_config()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            is_postgres = connection.dialect.name == "postgresql"
            if is_postgres:
                connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                # A session-level lock outlives this commit; Alembic then runs its own transaction.
                connection.commit()
            try:
                before = _revision_of(connection)
                connection.commit()  # let Alembic open and commit its own transaction
                # env.py uses this connection, so SQLite pragmas and the lock above apply.
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                after = _revision_of(connection)
            finally:
                if is_postgres:
                    connection.rollback()
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                    connection.commit()
            connection.commit()
    finally:
        engine.dispose()
    return RevisionChange(before=before, after=after)
