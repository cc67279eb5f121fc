"""MLflow tracking for flows: experiment set-up, dataset inputs, run artifacts and tags."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from kensa.settings import Settings

# MLflow and its dependencies print tips, telemetry notes and git warnings; kensa's own output
# is what a user should read.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def configure_mlflow(settings: Settings) -> MlflowClient:
    """Point MLflow at the settings' tracking server (embedded SQLite by default)."""
    settings.ensure_dirs()
    uri = settings.resolved_mlflow_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def ensure_experiment(settings: Settings, name: str) -> str:
    """The experiment's id, created on first use with artifacts under the data dir (embedded)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # A tracking server decides its own artifact store; the embedded default keeps them local.
    location = settings.artifacts_dir.resolve().as_uri() if not settings.mlflow_tracking_uri else None
    return client.create_experiment(name, artifact_location=location)


def log_dataset_input(root: Path, version: str, name: str, context: str = "training") -> None:
    """Record the dataset version as an MLflow dataset input (its digest is the version hash)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": all local files
        source = resolve_dataset_source(root.resolve().as_uri())
    # MetaDataset carries a name, a source and a digest and nothing else: exactly a version.
    dataset = MetaDataset(source=source, name=name, digest=version[:36])  # type: ignore[abstract]
    mlflow.log_input(dataset, context=context, tags={"kensa.dataset_version": version})


def flat_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of a metrics dict as MLflow metric names (``test.escape_rate``)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            out[_safe(name)] = float(value)
        elif isinstance(value, dict) and key not in ("confusion_matrix",):
            out.update(flat_metrics(name, value))
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-/ " else "_" for c in name)
