"""Gate an assessed model and record it as the flows do: MLflow run, tags, artifacts, registry.

The KPI gate plus the ONNX parity gate decide; every experiment leaves an MLflow run with its
evidence and, when a gate fails, the reason in ``kensa.gate.message``. Only a model that passes
every gate is registered, as ``candidate``, with the tags a flow-made model carries.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from kensa.flows.choose import tco
from kensa.flows.common import EXPERIMENT, FlowContext, planned_parts_millions, serving_cost_per_million
from kensa.flows.config import ProjectConfig
from kensa.flows.gate import GateResult, GateRow, corrupted_escape, evaluate_gate
from kensa.flows.register import register_candidate
from kensa.flows.stages import measure_latency
from kensa.flows.tracking import configure_mlflow, ensure_experiment, flat_metrics, log_dataset_input
from kensa.models.data.ingest import DatasetVersion
from kensa.models.evaluation.assess_model import Assessment, EvalOptions
from kensa.models.evaluation.evaluate_run import BandPolicy
from kensa.models.onnx.export import PARITY_ATOL
from kensa.registry import ALIAS_CHAMPION
from kensa.settings import Settings

log = logging.getLogger("kensa.flows.experiments")


@dataclass
class ExperimentResult:
    """What happened to an experiment: gate, evidence, and the registry version if it passed."""

    name: str
    run_id: str
    passed: bool
    reasons: list[str]
    gate: dict[str, Any]
    metrics: dict[str, Any]
    band: dict[str, Any]
    parity: dict[str, Any]
    registry_name: str
    model_version: str | None
    onnx_path: Path | None
    run_dir: Path
    latency_ms_per_image: float | None = None
    serving_cost_per_million: float | None = None
    currency: str = "USD"
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        head = (
            f"{self.name}: escape {m['escape_rate']:.2%}, false reject {m['false_reject_rate']:.2%}, "
            f"automation {m['automation_rate']:.1%}"
        )
        if self.passed:
            return f"{head} → candidate {self.registry_name} version {self.model_version}"
        return f"{head} → not registered: " + "; ".join(self.reasons)

    def _repr_markdown_(self) -> str:  # shown by Jupyter
        return GateResult(self.passed, [GateRow(**r) for r in self.gate["rows"]]).markdown(
            f"{self.name} ({self.summary()})"
        )


def _run_metrics(client: MlflowClient, run_id: str) -> dict[str, Any] | None:
    """The ``metrics.json`` a run logged, or None."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="metrics.json", dst_path=tmp
            )
            return dict(json.loads(Path(local).read_text()))
    except (mlflow.exceptions.MlflowException, OSError, ValueError):
        return None


def _champion_reference(
    client: MlflowClient, name: str, dataset_version: str
) -> tuple[dict[str, Any] | None, str]:
    """The champion's robustness report as relative CE's reference, when it saw this dataset.

    An experiment logs metrics.json on its own run; a sweep-made champion was registered from the
    sweep run, whose chosen trial (tag ``kensa.sweep.chosen_run``) holds them.
    """
    try:
        champ = client.get_model_version_by_alias(name, ALIAS_CHAMPION)
        run_ids = [champ.run_id] if champ.run_id else []
        if champ.run_id:
            chosen = client.get_run(champ.run_id).data.tags.get("kensa.sweep.chosen_run")
            run_ids += [chosen] if chosen else []
    except mlflow.exceptions.MlflowException:
        return None, ""
    for run_id in run_ids:
        metrics = _run_metrics(client, run_id)
        if metrics and metrics.get("robustness") and metrics.get("dataset_version") == dataset_version:
            return {**metrics["robustness"], "model": metrics.get("model")}, str(champ.version)
    return None, ""


def _parity_row(a: Assessment) -> GateRow:
    target = f"max |Δp| ≤ {PARITY_ATOL:g}, 100% verdicts"
    if a.export_error is None:
        p = a.parity
        achieved = f"{p['max_abs_prob_diff']:.1e}, {p['verdict_agreement']:.0%}"
        return GateRow("ONNX parity", target, achieved, True, "")
    return GateRow("ONNX parity", target, "failed", False, a.export_error)


def _log_params(name: str, a: Assessment, params: Mapping[str, Any]) -> None:
    logged: dict[str, Any] = {"model": name, "parameters": a.parameters, "input_size": a.input_size}
    for key, value in params.items():
        text = value if isinstance(value, str | int | float | bool) else json.dumps(value, default=str)
        logged[str(key)] = str(text)[:500]
    mlflow.log_params(logged)


def _log_evidence(a: Assessment, latency: float | None, serve: float | None) -> None:
    """The metrics and artifacts a flow stage logs, under the same names (comparable in MLflow)."""
    m = a.metrics
    rob = m["robustness"]
    values: dict[str, Any] = {
        "test": {
            k: m[k] for k in ("escape_rate", "false_reject_rate", "automation_rate", "accuracy", "error")
        },
        "robustness": {
            k: rob[k]
            for k in ("corrupted_error", "corrupted_escape_rate", "mean_error_gap", "mean_relative_ce")
            if rob.get(k) is not None
        },
    }
    if latency is not None and serve is not None:
        values.update({"latency_ms_per_image": latency, "cost.serving_per_million": serve})
    if a.parity.get("max_abs_prob_diff") is not None:
        values["parity_max_abs_diff"] = a.parity["max_abs_prob_diff"]
    mlflow.log_metrics(flat_metrics("", values))
    mlflow.log_dict(m, "metrics.json")
    mlflow.log_dict(a.parity, "parity.json")
    mlflow.log_dict(m["band"], "band.json")
    if (a.run_dir / "plots").is_dir():
        mlflow.log_artifacts(str(a.run_dir / "plots"), "plots")
    if a.onnx_path is not None:
        mlflow.log_artifact(str(a.onnx_path), "onnx")


def _register(
    a: Assessment, ctx: FlowContext, *, name: str, registered_by: str, source: str, serve: float
) -> str:
    """Register the passed model as ``candidate`` with the tags a flow-made model carries."""
    assert a.onnx_path is not None
    kpi = ctx.config.kpi
    rob = a.metrics["robustness"]
    registered = register_candidate(
        a.onnx_path,
        ctx.config.name,
        registered_by=registered_by,
        source=source,
        kpi={
            "passed": True,
            "experiment": name,
            "escape_rate": a.metrics["escape_rate"],
            "false_reject_rate": a.metrics["false_reject_rate"],
            "automation_rate": a.metrics["automation_rate"],
            "corrupted_escape_rate": corrupted_escape(rob, kpi.corruption_severity),
            "mean_relative_ce": rob.get("mean_relative_ce"),
        },
        cost={
            "training": None,  # trained outside kensa: not in the ledger
            "serving_per_million": serve,
            "tco": tco(0.0, serve, planned_parts_millions(ctx)),
            "currency": ctx.config.currency,
        },
        parity=a.parity,
        settings=ctx.settings,
    )
    return registered.version


def _result(
    a: Assessment, gate: GateResult, ctx: FlowContext, run_id: str, version: str | None, **extra: Any
) -> ExperimentResult:
    rob = a.metrics["robustness"]
    headline = ("escape_rate", "false_reject_rate", "automation_rate", "accuracy")
    return ExperimentResult(
        name=a.name,
        run_id=run_id,
        passed=gate.passed,
        reasons=gate.gaps,
        gate=gate.to_dict(),
        metrics={key: a.metrics[key] for key in headline}
        | {
            "corrupted_escape_rate": rob["corrupted_escape_rate"],
            "mean_relative_ce": rob.get("mean_relative_ce"),
        },
        band=a.metrics["band"],
        parity=a.parity,
        registry_name=ctx.config.name,
        model_version=version,
        onnx_path=a.onnx_path,
        run_dir=a.run_dir,
        currency=ctx.config.currency,
        extra={"signature": a.signature, "parameters": a.parameters, "kind": a.kind},
        **extra,
    )


def gate_and_record(
    assess: Callable[[EvalOptions, Path], Assessment],
    *,
    dataset: DatasetVersion,
    name: str,
    params: Mapping[str, Any],
    registered_by: str,
    project: ProjectConfig,
    settings: Settings,
    source: str,
    show_progress: bool,
) -> ExperimentResult:
    """Evaluate, gate, record in MLflow and, when every gate passes, register as ``candidate``."""
    client = configure_mlflow(settings)
    ctx = FlowContext(settings, project, client, ensure_experiment(settings, EXPERIMENT))
    reference, reference_version = _champion_reference(client, project.name, dataset.version)
    kpi = project.kpi
    options = EvalOptions(
        BandPolicy(
            alpha=kpi.max_escape_rate, delta=1 - kpi.confidence, max_false_reject=kpi.max_false_reject_rate
        ),
        reference,
        project.sweep.max_robustness_images,
        show_progress,
    )
    tags = {
        "kensa.stage": "experiment",
        "kensa.source": source,
        "kensa.dataset_version": dataset.version,
        "kensa.registered_by": registered_by,
    }
    if reference_version:
        tags["kensa.reference"] = f"{project.name}/{reference_version}"
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=name, tags=tags) as run:
        run_id = run.info.run_id
        log_dataset_input(
            dataset.root, dataset.version, name=f"line-{dataset.short_version}", context="evaluation"
        )
        try:
            a = assess(options, settings.data_dir / "runs" / run_id)
        except Exception as exc:
            # Visible in MLflow with the reason, like a gate failure, then raised to the caller.
            mlflow.set_tags({"kensa.gate": "failed", "kensa.gate.message": f"not evaluated: {exc}"[:5000]})
            raise
        _log_params(name, a, params)
        latency = serve = None
        if a.onnx_path is not None:
            latency = measure_latency(a.onnx_path, a.input_size, project.serving.batch_size)
            serve = serving_cost_per_million(ctx, latency)
        _log_evidence(a, latency, serve)
        kpi_gate = evaluate_gate(a.metrics, kpi, check_relative_ce=reference is not None)
        gate = GateResult(kpi_gate.passed and a.export_error is None, [*kpi_gate.rows, _parity_row(a)])
        mlflow.set_tags(
            {"kensa.gate": "passed" if gate.passed else "failed", "kensa.gate.message": gate.message()[:5000]}
        )
        mlflow.log_dict(gate.to_dict(), "kpi_gate.json")
        version = None
        if gate.passed and serve is not None:
            version = _register(a, ctx, name=name, registered_by=registered_by, source=source, serve=serve)
            mlflow.set_tag("kensa.model_version", version)
    log.info(
        "experiment_gated",
        extra={
            "run_name": name,
            "source": source,
            "run_id": run_id,
            "passed": gate.passed,
            "model_version": version,
        },
    )
    return _result(
        a, gate, ctx, run_id, version, latency_ms_per_image=latency, serving_cost_per_million=serve
    )
