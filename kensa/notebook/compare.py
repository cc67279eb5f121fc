"""Two registered model versions side by side, on the dataset version they were judged on.

Fetches each version's ONNX file from the registry (checking the SHA-256 recorded at
registration), finds the dataset from the version's MLflow run (its dataset input), and measures
both with ``kensa.models.evaluation.compare_onnx`` on this machine: same parts, same corrupted
copies, same clock.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kensa.flows.common import EXPERIMENT, FlowContext, serving_cost_per_million, write_json
from kensa.flows.config import ProjectConfig, load_project_config
from kensa.flows.stages import measure_latency
from kensa.flows.tracking import configure_mlflow, ensure_experiment
from kensa.models.data.ingest import DatasetVersion, load_dataset
from kensa.models.evaluation.compare_onnx import ComparedModel, Comparison, compare_models, plot_comparison
from kensa.models.onnx.contract import sha256_file
from kensa.registry import ONNX_FILE, TAG_DATASET_VERSION, TAG_SHA256
from kensa.settings import Settings


class CompareError(ValueError):
    """A comparison that cannot be made (unknown version, no dataset, tampered file)."""


@dataclass(frozen=True)
class ComparisonResult:
    comparison: Comparison
    plot: Path
    report: Path
    notes: list[str]


def registry_context(config: ProjectConfig | str | Path | None, settings: Settings | None) -> FlowContext:
    """Settings, project config, MLflow client and experiment for a command on registered versions."""
    settings = settings or Settings()
    project = (
        config
        if isinstance(config, ProjectConfig)
        else load_project_config(Path(config) if config else settings.project_config)
    )
    client = configure_mlflow(settings)
    return FlowContext(settings, project, client, ensure_experiment(settings, EXPERIMENT))


def get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        msg = f"{name} has no version {version!r}"
        raise CompareError(msg) from None


def download_version(client: MlflowClient, name: str, version: str, into: Path) -> Path:
    mv = get_version(client, name, version)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(into)))
    path = local / ONNX_FILE
    recorded = mv.tags.get(TAG_SHA256)
    if recorded and sha256_file(path) != recorded:
        msg = f"{name}/{version}: the stored ONNX file does not match the SHA-256 recorded at registration"
        raise CompareError(msg)
    return path


def dataset_of(client: MlflowClient, name: str, version: str) -> Path | None:
    """The dataset folder a version's run logged as its MLflow dataset input, if still there."""
    run_id = get_version(client, name, version).run_id
    if not run_id:
        return None
    inputs = client.get_run(run_id).inputs
    for entry in inputs.dataset_inputs if inputs is not None else []:
        try:
            uri = json.loads(entry.dataset.source).get("uri", "")
        except (ValueError, AttributeError):
            continue
        parsed = urlparse(uri)
        if parsed.scheme == "file" and Path(unquote(parsed.path)).is_dir():
            return Path(unquote(parsed.path))
    return None


def _pick_dataset(
    client: MlflowClient, name: str, versions: tuple[str, str], data: Path | None
) -> tuple[DatasetVersion, list[str]]:
    notes: list[str] = []
    root = data or dataset_of(client, name, versions[0]) or dataset_of(client, name, versions[1])
    if root is None:
        msg = (
            f"cannot find the dataset {name}/{versions[0]} was evaluated on (its run logged no local "
            "dataset folder that still exists); pass --data DIR"
        )
        raise CompareError(msg)
    ds = load_dataset(root)
    for v in versions:
        judged_on = get_version(client, name, v).tags.get(TAG_DATASET_VERSION, "")
        if judged_on and judged_on != ds.version:
            notes.append(
                f"version {v} was judged on dataset {judged_on[:12]}, compared here on {ds.short_version}"
            )
    return ds, notes


def compare_versions(
    version_a: str,
    version_b: str,
    *,
    name: str | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    config: ProjectConfig | str | Path | None = None,
    settings: Settings | None = None,
    max_robustness_images: int | None = None,
    show_progress: bool = True,
) -> ComparisonResult:
    """Compare two registry versions on the same test parts and corrupted copies; write plot + JSON.

    Latency is measured here at the project's serving batch size and priced with its serving plan,
    so cost per million parts compares like with like. Relative CE uses ``version_a`` as reference.
    """
    ctx = registry_context(config, settings)
    settings, project, client = ctx.settings, ctx.config, ctx.client
    model = name or project.name
    for v in (version_a, version_b):
        get_version(client, model, v)  # an unknown version fails before any download or evaluation
    ds, notes = _pick_dataset(client, model, (version_a, version_b), Path(data) if data else None)
    out_dir = Path(out) if out else settings.data_dir / "compare"
    stem = f"compare_{model}_v{version_a}_v{version_b}"
    with tempfile.TemporaryDirectory() as tmp:
        paths = [download_version(client, model, v, Path(tmp) / v) for v in (version_a, version_b)]
        comparison = compare_models(
            ComparedModel(f"v{version_a}", paths[0]),
            ComparedModel(f"v{version_b}", paths[1]),
            ds,
            latency=lambda path, size: measure_latency(path, size, project.serving.batch_size),
            cost_per_million=lambda ms: serving_cost_per_million(ctx, ms),
            currency=project.currency,
            max_robustness_images=max_robustness_images or project.sweep.max_robustness_images,
            show_progress=show_progress,
        )
    first, second = comparison.rows
    if second.relative_ce is None:
        notes.append(
            f"relative CE is undefined: {first.label}'s error does not grow under corruption, "
            "so it gives no scale to compare against"
        )
    plot = plot_comparison(comparison, out_dir / f"{stem}.png")
    report = write_json(out_dir / f"{stem}.json", {**comparison.to_dict(), "notes": notes})
    return ComparisonResult(comparison, plot, report, notes)
