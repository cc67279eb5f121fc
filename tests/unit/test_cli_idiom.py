"""The ``kensa`` command's shared conventions: --version, --json, exit codes, markup-safe errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kensa
from kensa.cli.common import ExitCode, Role, get_settings
from kensa.cli.main import app


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str | None]]:
    """Each test gets its own embedded store (SQLite under its data dir)."""
    get_settings.cache_clear()  # one Settings per CLI process
    yield {"KENSA_DATA_DIR": str(tmp_path / "kensa"), "KENSA_STORE_URL": None, "KENSA_WEBHOOK_URL": None}
    get_settings.cache_clear()


def _invoke(env: dict[str, str | None], *args: str) -> tuple[int, str, str]:
    get_settings.cache_clear()
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def _kensa(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command in its own process: what a script piping to jq gets on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KENSA_")}
    env["KENSA_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "kensa.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_version_prints_the_package_version_and_exits_0() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"kensa {kensa.__version__}\n"


def test_keys_list_json_is_pure_json_with_the_holder(tmp_path: Path) -> None:
    made = _kensa(tmp_path / "kensa", "keys", "create", "--role", "line", "--name", "line-3 [PLC]")
    assert made.returncode == 0, made.stderr
    listed = _kensa(tmp_path / "kensa", "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout)  # the whole of stdout: no table, no markup, no log line
    assert [(k["name"], k["role"], k["revoked_at"]) for k in keys] == [("line-3 [PLC]", "line", None)]
    assert made.stdout.strip().startswith(keys[0]["prefix"])  # the prefix, never the key
    assert made.stdout.strip() not in listed.stdout


def test_alerts_list_and_cost_json_parse(env: dict[str, str | None]) -> None:
    from kensa.monitoring.alerts import open_alert
    from kensa.settings import Settings
    from kensa.store.connect import open_store

    with open_store(Settings(data_dir=Path(env["KENSA_DATA_DIR"] or "")))() as session:
        open_alert(session, level="critical", kind="drift", cause="brightness [lamp] -7σ", line_id="L2")
        session.commit()
    code, out, err = _invoke(env, "alerts", "list", "--json")
    assert code == 0, err
    alerts = json.loads(out)
    assert [(a["level"], a["cause"], a["line_id"]) for a in alerts] == [
        ("critical", "brightness [lamp] -7σ", "L2")
    ]
    code, out, err = _invoke(env, "cost", "--json")
    assert code == 0, err
    assert json.loads(out) == {"lines": [], "totals": {}}


def test_db_current_check_json_on_an_empty_store_exits_3(env: dict[str, str | None]) -> None:
    code, out, _ = _invoke(env, "db", "current", "--check", "--json")
    assert code == ExitCode.GATE == 3
    state = json.loads(out)
    assert state["current"] is None and state["up_to_date"] is False and state["newest"]


def test_an_unknown_choice_is_bad_input_exit_2_and_changes_nothing(env: dict[str, str | None]) -> None:
    code, _, err = _invoke(env, "keys", "create", "--role", "superuser", "--name", "x")
    assert code == ExitCode.INVALID == 2
    assert "'superuser' is not one of" in err and "'data-scientist'" in err
    code, out, _ = _invoke(env, "keys", "list", "--json")
    assert code == 0 and json.loads(out) == []


def test_an_error_naming_user_input_keeps_its_square_brackets(
    env: dict[str, str | None], tmp_path: Path
) -> None:
    folder = tmp_path / "[draft]"
    folder.mkdir()
    get_settings.cache_clear()
    result = CliRunner().invoke(
        app, ["train", "--data", str(folder), "--out", str(tmp_path / "run")], env=env
    )
    code, err = result.exit_code, result.stderr
    assert code == ExitCode.INVALID, (err, result.exception)
    # rich would read "[draft]" as a style tag and drop it; the user must see the path they gave.
    assert f"kensa data ingest {folder.resolve()}" in " ".join(err.split())
    assert not (tmp_path / "run").exists()


def test_role_choices_are_the_stores_roles() -> None:
    from kensa.store.models import ROLES

    assert [r.value for r in Role] == list(ROLES)


def test_exit_codes_are_the_documented_table() -> None:
    table = (Path(__file__).parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    for code in ExitCode:
        assert f"| {code.value} | `{code.name}` |" in table, f"{code!r} is not in docs/cli.md"


def test_invalid_settings_are_named_and_exit_2_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kensa.cli.main", "keys", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "KENSA_DATA_DIR": str(tmp_path), "KENSA_CLASSES": "defect_a,ok"},
        check=False,
    )
    assert result.returncode == ExitCode.INVALID
    assert "invalid settings: KENSA_CLASSES" in result.stderr and "must start with 'ok'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
