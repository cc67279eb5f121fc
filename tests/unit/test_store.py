"""The embedded SQLite store and `kensa db`: engine settings, migrations, input checks, CLI."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.util import CommandError
from sqlalchemy import text
from typer.testing import CliRunner

from kensa.cli import db
from kensa.cli.common import EXIT_INVALID, get_settings
from kensa.store.audit import append_event
from kensa.store.engine import (
    SQLITE_BUSY_TIMEOUT_MS,
    StoreURLError,
    display_url,
    make_engine,
    make_session_factory,
    normalize_url,
)
from kensa.store.keys import create_key
from kensa.store.migrate import current_revision, head_revision, upgrade
from kensa.store.models import ROLES


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'nested' / 'data' / 'kensa.db'}"


def test_sqlite_engine_creates_the_folder_and_turns_on_wal_and_foreign_keys(
    tmp_path: Path, sqlite_url: str
) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            journal = conn.execute(text("PRAGMA journal_mode")).scalar()
            foreign_keys = conn.execute(text("PRAGMA foreign_keys")).scalar()
            busy = conn.execute(text("PRAGMA busy_timeout")).scalar()
    finally:
        engine.dispose()
    assert (journal, foreign_keys, busy) == ("wal", 1, SQLITE_BUSY_TIMEOUT_MS)
    db_file = tmp_path / "nested" / "data" / "kensa.db"
    assert db_file.exists()
    # WAL is a property of the file: any other SQLite client sees it too.
    with sqlite3.connect(db_file) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(
    "url", ["postgresql://kensa:s3cret@db:5432/kensa", "postgres://kensa:s3cret@db/kensa"]
)
def test_plain_postgres_urls_use_psycopg_3(url: str) -> None:
    assert normalize_url(url).drivername == "postgresql+psycopg"
    engine = make_engine(url)  # no connection is opened
    try:
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()
    assert "s3cret" not in display_url(url)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", "mongodb://h/db"])
def test_unsupported_store_urls_are_refused_with_what_is_accepted(url: str) -> None:
    with pytest.raises(StoreURLError, match="sqlite"):
        make_engine(url)


def test_current_revision_of_a_missing_sqlite_file_is_none_and_creates_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    assert current_revision(sqlite_url) is None
    assert not (tmp_path / "nested").exists()


def test_migrations_run_from_any_working_directory(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert upgrade(sqlite_url).after == head_revision()
    assert not any(elsewhere.iterdir())


def test_upgrade_to_an_unknown_revision_is_an_error(sqlite_url: str) -> None:
    with pytest.raises(CommandError):
        upgrade(sqlite_url, "no-such-revision")


def test_store_inputs_are_checked_before_writing(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with make_session_factory(engine)() as session:
            with pytest.raises(ValueError, match="accepted roles: line, operator"):
                create_key(session, "someone", "superuser")
            with pytest.raises(ValueError, match="non-empty name"):
                create_key(session, "  ", ROLES[0])
            with pytest.raises(ValueError, match="JSON-serialisable"):
                append_event(session, actor="a", action="b", subject="c", details={"x": {1, 2}})
            with pytest.raises(ValueError, match="actor"):
                append_event(session, actor="", action="b", subject="c")
    finally:
        engine.dispose()


# --- kensa db --------------------------------------------------------------------------------


@pytest.fixture
def runner_env(tmp_path: Path) -> Iterator[dict[str, str | None]]:
    # get_settings() is cached per process; each CLI test needs its own data dir.
    get_settings.cache_clear()
    yield {"KENSA_DATA_DIR": str(tmp_path / "kensa-data"), "KENSA_STORE_URL": None}
    get_settings.cache_clear()


def test_db_upgrade_creates_the_store_and_reports_revisions(
    tmp_path: Path, runner_env: dict[str, str | None]
) -> None:
    runner = CliRunner()

    first = runner.invoke(db.app, ["upgrade"], env=runner_env)
    assert first.exit_code == 0, first.output
    assert "none (empty store)" in first.output
    assert head_revision() in first.output
    assert "upgraded" in first.output
    db_file = tmp_path / "kensa-data" / "kensa.db"
    with sqlite3.connect(db_file) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    get_settings.cache_clear()
    second = runner.invoke(db.app, ["upgrade"], env=runner_env)
    assert second.exit_code == 0, second.output
    assert "already up to date" in second.output

    get_settings.cache_clear()
    current = runner.invoke(db.app, ["current", "--check"], env=runner_env)
    assert current.exit_code == 0, current.output
    assert f"current   {head_revision()}" in current.output


def test_db_current_check_fails_on_an_empty_store(runner_env: dict[str, str | None]) -> None:
    result = CliRunner().invoke(db.app, ["current", "--check"], env=runner_env)
    assert result.exit_code == 3  # ExitCode.GATE: the check said no (1 stays for failures)
    assert "kensa db upgrade" in result.output


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["upgrade", "--revision", "nope"], {}, "cannot upgrade to revision"),
        (["upgrade"], {"KENSA_STORE_URL": "mysql://u:pw@h/db"}, "invalid KENSA_STORE_URL"),
    ],
)
def test_db_upgrade_bad_input_exits_with_a_clear_message(
    runner_env: dict[str, str | None], args: list[str], env: dict[str, str], message: str
) -> None:
    result = CliRunner().invoke(db.app, args, env={**runner_env, **env})
    assert result.exit_code == EXIT_INVALID
    assert message in result.output
    assert "Traceback" not in result.output
    assert "pw@" not in result.output
