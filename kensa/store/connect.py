"""Open the store named by Settings, migrated to head, as a session factory."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from kensa.settings import Settings
from kensa.store.engine import make_engine, make_session_factory
from kensa.store.migrate import upgrade


@lru_cache(maxsize=8)
def _factory(url: str) -> sessionmaker[Session]:
    upgrade(url)  # idempotent; a fresh embedded store just works
    return make_session_factory(make_engine(url))


def open_store(settings: Settings) -> sessionmaker[Session]:
    """A session factory on the settings' store (SQLite under data_dir by default)."""
    settings.ensure_dirs()
    return _factory(settings.resolved_store_url)
