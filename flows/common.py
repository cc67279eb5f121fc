"""What every flow needs: settings, project config, MLflow and recording helpers (no Prefect import,
so the notebook API can share them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from kensa.flows.compute import device_hours
from kensa.flows.config import ProjectConfig, load_project_config
from kensa.flows.ledger import LedgerLine, record_cost
from kensa.flows.stages import StageOutcome
from kensa.flows.tracking import configure_mlflow, ensure_experiment, flat_metrics
from kensa.models.evaluation.evaluate_run import BandPolicy
from kensa.settings import Settings

EXPERIMENT = "kensa"


@dataclass
class FlowContext:
    """Built once at the start of a flow run (the flow is an entry point) and passed down."""

    settings: Settings
    config: ProjectConfig
    client: MlflowClient
    experiment_id: str

    @property
    def policy(self) -> BandPolicy:
        k = self.config.kpi
        return BandPolicy(
            alpha=k.max_escape_rate,
            delta=1 - k.confidence,
            max_false_reject=k.max_false_reject_rate,
        )


def flow_context(config_path: str | None) -> FlowContext:
    settings = Settings()
    path = Path(config_path) if config_path else settings.project_config
    config = load_project_config(path)
    client = configure_mlflow(settings)
    return FlowContext(settings, config, client, ensure_experiment(settings, EXPERIMENT))


def log_outcome(client: MlflowClient, run_id: str, outcome: StageOutcome) -> None:
    """Params, metrics and artifacts of a stage, on an explicit run (thread-safe)."""
    cfg = outcome.train
    for key, value in {
        "model": outcome.model,
        "fraction": outcome.fraction,
        "parameters": outcome.parameters,
        "train_images": outcome.train_images,
        "epochs_run": cfg["epochs_run"],
    }.items():
        client.log_param(run_id, key, value)
    metrics = flat_metrics(
        "",
        {
            "test": {
                k: outcome.metrics[k]
                for k in (
                    "escape_rate",
                    "false_reject_rate",
                    "automation_rate",
                    "accuracy",
                    "error",
                    "defect_auroc",
                )
                if outcome.metrics.get(k) is not None
            },
            "robustness": {
                k: outcome.metrics["robustness"][k]
                for k in (
                    "corrupted_error",
                    "corrupted_escape_rate",
                    "mean_error_gap",
                    "mean_relative_ce",
                )
                if outcome.metrics["robustness"].get(k) is not None
            },
            "latency_ms_per_image": outcome.latency_ms_per_image,
            "train_seconds": cfg["train_seconds"],
            "train_images_per_second": cfg["images_per_second"],
            "parity_max_abs_diff": outcome.parity["max_abs_prob_diff"],
        },
    )
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_dict(run_id, outcome.metrics, "metrics.json")
    client.log_dict(run_id, outcome.parity, "parity.json")
    client.log_dict(run_id, outcome.metrics["band"], "band.json")
    plots = outcome.run_dir / "plots"
    if plots.is_dir():
        client.log_artifacts(run_id, str(plots), "plots")
    client.log_artifact(run_id, str(outcome.onnx_path), "onnx")
    client.log_artifact(run_id, str(outcome.run_dir / "train.json"))


def record_stage_cost(ctx: FlowContext, run_id: str, stage: str, target: str, seconds: float) -> LedgerLine:
    t = ctx.config.targets[target]
    hours = device_hours(seconds, t)
    line = LedgerLine(run_id, stage, target, None, hours, hours * t.cost_per_hour, ctx.config.currency)
    record_cost(ctx.settings, line, ctx.client)
    return line


def serving_cost_per_million(ctx: FlowContext, latency_ms_per_image: float) -> float:
    """Serving cost of a million parts: device time per part × the serving host's hourly price."""
    hours = latency_ms_per_image / 1000.0 * 1e6 / 3600.0
    return hours * ctx.config.serving.cost_per_hour


def planned_parts_millions(ctx: FlowContext) -> float:
    s = ctx.config.serving
    return s.parts_per_day * s.planned_life_days / 1e6


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
