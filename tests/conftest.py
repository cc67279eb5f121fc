"""Shared fixtures: tiny synthetic lines made on the fly, ingested, and trained runs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Prefect reads its environment at import: keep tests out of ~/.prefect and patient on 2 cores.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="kensa-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from kensa.settings import Settings  # noqa: E402


def require_service(reason: str) -> None:
    """Skip where a real service is missing, but fail in CI (KENSA_REQUIRE_SERVICES=1)."""
    if os.environ.get("KENSA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("kensa-data"))


def make_line(root: Path, n: int, seed: int, image_size: int, settings: Settings) -> Path:
    from kensa.models.data.ingest import ingest_dataset
    from kensa.models.line.synthetic import LineConditions, generate_dataset

    generate_dataset(root, n=n, seed=seed, image_size=image_size, conditions=LineConditions())
    ingest_dataset(root, settings)
    return root


@pytest.fixture(scope="session")
def tiny_line(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Path:
    """An ingested synthetic line: 360 parts at 64 px (seconds to make, enough for every split)."""
    return make_line(tmp_path_factory.mktemp("line") / "data", 360, 7, 64, settings)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_line: Path) -> Path:
    """A small model trained and evaluated (band calibrated) on the tiny line."""
    from kensa.models.evaluation.evaluate_run import evaluate_run
    from kensa.models.train.trainer import TrainConfig, train

    run = tmp_path_factory.mktemp("run") / "small"
    train(
        tiny_line,
        TrainConfig(model="mobilenet_v3_small", epochs=3, seed=0),
        run,
        show_progress=False,
    )
    evaluate_run(run, show_progress=False)
    return run


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API for every test module that runs flows in this process.

    Starting one costs about 15 s on 2 cores; modules share it and tell their runs apart by id.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
