"""The whole loop in one command, as a new user runs it: `kensa demo` at small scale.

Real parts only: the demo runs in its own process with the store on the test PostgreSQL; it
generates a line, runs the pilot and its KPI gate, the sweep, approves the candidate as
`demo-operator`, starts `kensa serve` (uvicorn) on 127.0.0.1, streams clean parts and then a
lighting drop over HTTP, runs the drift check (alert, review sample, retraining flow through
Prefect), waits out the escalation delay and pages its local webhook receiver. The test then reads
what a user would look at afterwards: the registry, the store and the audit log.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from config_helpers import LENIENT_KPI
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from kensa.store.models import Alert, AuditEvent, Prediction, ReviewItem

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The example config's shape with lenient targets and short training: the loop, not the model's
# quality, is under test here (the KPI gate and the sweep's choice have their own tests).
CONFIG = f"""
name = "kensa-qc"
{LENIENT_KPI}max_relative_ce = 100.0
[pilot]
model = "tiny_cnn"
fraction = 1.0
epochs = 2
target = "onprem-gpu"
[sweep]
models = ["tiny_cnn"]
fractions = [0.5, 1.0]
epochs = 2
target = "onprem-gpu"
max_robustness_images = 16
[approval]
two_person = true
approver_roles = ["admin", "operator"]
"""


def test_make_demo_runs_the_whole_loop(tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    store_url = make_pg_database()
    config = tmp_path / "kensa.toml"
    config.write_text(CONFIG)
    # A new user's environment: nothing kensa or MLflow read is inherited from earlier tests.
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("KENSA_", "MLFLOW_")) and k != "PREFECT_API_URL"}  # fmt: skip
    mlflow_uri = f"sqlite:///{tmp_path / 'kensa' / 'mlflow.db'}"
    env = {
        **inherited,
        "KENSA_DATA_DIR": str(tmp_path / "kensa"),
        "KENSA_MLFLOW_TRACKING_URI": mlflow_uri,
        "KENSA_STORE_URL": store_url,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "COLUMNS": "160",
    }
    args = [sys.executable, "-m", "kensa.cli.main", "demo", "--out", str(tmp_path / "demo"),
            "--n", "800", "--image-size", "32", "--config", str(config),
            "--clean-parts", "300", "--drift-parts", "300", "--shift", "lighting=0.5"]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "Traceback" not in out, out[-6000:]
    # The summary and where to look, as printed for the user.
    assert "the whole loop in" in out and "/console" in out and "operator key" in out, out[-3000:]

    client = MlflowClient(mlflow_uri, mlflow_uri)  # registry too: not the process-wide one
    champion = client.get_model_version_by_alias("kensa-qc", "champion")
    candidate = client.get_model_version_by_alias("kensa-qc", "candidate")
    assert candidate.tags["kensa.source"] == "retrain"  # the retraining flow's candidate...
    assert int(candidate.version) > int(champion.version)  # ...waits; the champion is unchanged

    engine = create_engine(store_url)
    try:
        with Session(engine) as s:
            # Every streamed part has its verdict logged, tagged with the approved champion.
            versions = s.execute(select(Prediction.model_version, func.count())
                                 .group_by(Prediction.model_version)).all()  # fmt: skip
            assert dict(versions) == {str(champion.version): 600}, versions
            # The approval is on the audit trail under the demo operator's name.
            approvals = s.scalars(select(AuditEvent).where(AuditEvent.action == "model.approve")).all()
            assert [(e.actor, e.subject.endswith(f"/{champion.version}")) for e in approvals] == [
                ("demo-operator", True)
            ], [(e.actor, e.subject) for e in approvals]
            # The lighting drop: a critical drift alert, escalated because nobody acknowledged it.
            critical = s.scalars(select(Alert).where(Alert.level == "critical", Alert.kind == "drift")).all()
            assert critical and critical[0].status == "escalated", [(a.id, a.status) for a in critical]
            assert critical[0].details["retrain_run"]
            assert critical[0].details["webhook"]["status"] == "delivered", critical[0].details
            escalations = s.scalars(select(AuditEvent).where(AuditEvent.action == "alert.escalate")).all()
            assert escalations and all(e.actor == "kensa-monitor" for e in escalations), [
                (e.actor, e.details) for e in escalations
            ]
            # A sample of the drifted window waits for people in the review queue.
            drift_items = s.scalar(select(func.count()).select_from(ReviewItem)
                                   .where(ReviewItem.reason == "drift"))  # fmt: skip
            assert drift_items and drift_items > 0
    finally:
        engine.dispose()
    # The local paging system got the escalation with a valid HMAC signature.
    assert "with a valid signature" in out
    assert " 0 with a valid signature" not in out, out[-3000:]
