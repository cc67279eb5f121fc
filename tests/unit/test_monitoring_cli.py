"""``kensa alerts`` and ``kensa drift check``: the operator's commands, their messages and exit codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from monitoring_helpers import log_parts, make_parts, reference
from typer.testing import CliRunner

from kensa.cli.common import EXIT_INVALID, get_settings
from kensa.cli.main import app
from kensa.monitoring.alerts import open_alert
from kensa.settings import Settings
from kensa.store.connect import open_store


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str | None]]:
    get_settings.cache_clear()  # one Settings per CLI process; each test has its own data dir
    yield {"KENSA_DATA_DIR": str(tmp_path / "kensa"), "KENSA_STORE_URL": None, "KENSA_WEBHOOK_URL": None}
    get_settings.cache_clear()


def _run(env: dict[str, str | None], *args: str) -> tuple[int, str]:
    get_settings.cache_clear()
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_an_operator_lists_acknowledges_escalates_and_resolves_an_alert(env: dict[str, str | None]) -> None:
    settings = Settings(data_dir=Path(env["KENSA_DATA_DIR"] or ""))
    with open_store(settings)() as session:
        alert = open_alert(
            session, level="critical", kind="drift", cause="brightness: mean -7.1σ", line_id="L2"
        )
        session.commit()
    code, out = _run(env, "alerts", "list")
    assert code == 0 and "brightness: mean -7.1σ" in out and "critical" in out
    code, out = _run(env, "alerts", "ack", str(alert.id), "--by", "ann")
    assert code == 0 and f"alert {alert.id} is now acknowledged (by ann)" in out
    code, out = _run(env, "alerts", "ack", str(alert.id), "--by", "ann")
    assert code == EXIT_INVALID and "is acknowledged; it cannot become acknowledged" in out
    code, out = _run(env, "alerts", "escalate", str(alert.id), "--by", "ann")
    assert code == 0 and "escalated" in out and "webhook: not_configured" in out
    code, out = _run(env, "alerts", "resolve", str(alert.id), "--by", "bob", "--comment", "lamp replaced")
    assert code == 0
    code, out = _run(env, "alerts", "list")
    assert code == 0 and "no active alerts" in out
    code, out = _run(env, "alerts", "show", str(alert.id))
    shown = json.loads(out)
    assert (shown["status"], shown["resolved_by"], shown["comment"]) == ("resolved", "bob", "lamp replaced")
    assert [h["to"] for h in shown["history"]] == ["acknowledged", "escalated", "resolved"]


def test_bad_alert_commands_exit_2_saying_what_is_accepted(env: dict[str, str | None]) -> None:
    code, out = _run(env, "alerts", "ack", "42", "--by", "ann")
    assert code == EXIT_INVALID and "alert 42 does not exist" in out
    code, out = _run(env, "alerts", "list", "--status", "closed")
    accepted = ("active", "open", "acknowledged", "escalated", "resolved", "all")
    assert code == EXIT_INVALID and "'closed' is not one of" in out
    assert all(f"'{status}'" in out for status in accepted), out
    code, out = _run(env, "drift", "check", "--window", "5")
    assert code == EXIT_INVALID and "at least 20 parts" in out
    code, out = _run(env, "drift", "check", "--mode", "hourly")
    assert code == EXIT_INVALID and "'hourly' is not one of 'count'," in out and "'time'" in out
    code, out = _run(env, "drift", "check", "--reference", "/nonexistent/ref.npz")
    assert code == EXIT_INVALID and "not a file" in out


@pytest.mark.slow
def test_drift_check_scores_the_log_and_reports_per_line(env: dict[str, str | None], tmp_path: Path) -> None:
    settings = Settings(data_dir=Path(env["KENSA_DATA_DIR"] or ""))
    rng = np.random.default_rng(3)
    ref = reference(rng).save(tmp_path / "ref.npz")
    log_parts(open_store(settings), make_parts(rng, 400), line="L7", camera=None)
    code, out = _run(env, "drift", "check", "--reference", str(ref), "--no-reports", "--no-retrain", "--json")
    assert code == 0, out
    outcome = json.loads(out[out.index("{") :])
    group = outcome["groups"][0]
    assert group["group"].startswith("L7/*") and group["windows"] == 5 and group["levels"] == {"none": 5}
    assert outcome["alerts"] == []
