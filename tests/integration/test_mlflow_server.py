"""The pilot flow against a real `mlflow server`: PostgreSQL backend, proxied artifacts.

The production shape of tracking: runs and registry in PostgreSQL (a fresh database per module),
artifacts uploaded through the server (``--serve-artifacts``) into a folder the client never sees.
The flow runs in this process on Prefect's embedded API, with only
``KENSA_MLFLOW_TRACKING_URI`` pointing elsewhere than the embedded default.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from servers import MODEL_NAME, Running, mlflow_server, write_config
from sqlalchemy import Engine, create_engine, text

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_database(pg_admin_engine: Engine) -> Iterator[str]:
    """A fresh ``kensa_mlflow_<hex>`` database (skips, or fails in CI, without PostgreSQL)."""
    name = f"kensa_mlflow_{secrets.token_hex(6)}"
    with pg_admin_engine.connect() as conn:  # AUTOCOMMIT: CREATE DATABASE needs it
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_admin_engine.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with pg_admin_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class TrackedPilot:
    server: Running
    backend: str
    artifacts: Path
    data_dir: Path
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def tracked_pilot(
    mlflow_database: str, tiny_line: Path, tmp_path_factory: pytest.TempPathFactory, prefect_harness: None
) -> Iterator[TrackedPilot]:
    """`mlflow server` up, then one pilot → sweep → candidate run tracked there."""
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    with (
        mlflow_server(mlflow_database, artifacts, root / "mlflow.log") as server,
        pytest.MonkeyPatch.context() as mp,
    ):
        # What a production worker's environment says; everything else stays at its default.
        mp.setenv("KENSA_DATA_DIR", str(root / "kensa"))
        mp.setenv("KENSA_MLFLOW_TRACKING_URI", server.url)
        from kensa.flows.pilot import pilot

        summary = pilot(data=str(tiny_line), config_path=str(write_config(root)), registered_by="dana")
        try:
            yield TrackedPilot(server, mlflow_database, artifacts, root / "kensa", summary)
        finally:
            # configure_mlflow() set MLflow's process-wide URIs to this server.
            mlflow.set_tracking_uri(before[0])
            mlflow.set_registry_uri(before[1])


def test_runs_and_registry_live_in_postgres_and_artifacts_go_through_the_server(
    tracked_pilot: TrackedPilot,
) -> None:
    version = tracked_pilot.summary["sweep"]["model_version"]
    engine = create_engine(tracked_pilot.backend)
    try:
        with engine.connect() as conn:
            models = conn.execute(text("SELECT name FROM registered_models")).scalars().all()
            aliases = conn.execute(
                text("SELECT alias, version FROM registered_model_aliases WHERE name = :n"), {"n": MODEL_NAME}
            ).all()
            run_names = set(
                conn.execute(text("SELECT name FROM runs WHERE lifecycle_stage = 'active'")).scalars()
            )
    finally:
        engine.dispose()
    assert models == [MODEL_NAME]
    assert ("candidate", int(version)) in [(a, int(v)) for a, v in aliases]
    assert {"pilot", "sweep", "tiny_cnn@0.5"} <= run_names

    client = MlflowClient(tracking_uri=tracked_pilot.server.url, registry_uri=tracked_pilot.server.url)
    experiment = client.get_experiment_by_name("kensa")
    # The server chose the artifact store; the client only ever saw the proxy scheme...
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    # ...and the files landed in the server's destination, uploaded over HTTP.
    stored = [p.name for p in tracked_pilot.artifacts.rglob("*") if p.is_file()]
    assert "model.onnx" in stored and "kpi_gate.json" in stored
    # Nothing fell back to the embedded SQLite default.
    assert not (tracked_pilot.data_dir / "mlflow.db").exists()


def test_candidate_loads_from_the_registry_and_predicts(tracked_pilot: TrackedPilot) -> None:
    mlflow.set_tracking_uri(tracked_pilot.server.url)
    mlflow.set_registry_uri(tracked_pilot.server.url)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)  # NHWC
    out = model.predict({"images": images})
    probs = np.asarray(out["probs"])
    assert probs.shape == (3, 6)  # the synthetic line's six classes
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
