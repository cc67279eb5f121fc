"""Prefect flow `retrain`: the champion's data plus reviewed labels, same recipe, a new candidate.

Critical drift (``flows/drift_check.py``) or an operator (``kensa retrain``, an escalated alert)
calls :func:`start_retraining`, which starts the ``retrain/retrain`` deployment on a Prefect
server when one is registered there, and runs the flow in this process otherwise (the embedded
default). The flow never promotes: the candidate waits for a person (``kensa approve``).
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as prefect_flow_run
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from kensa.flows.common import FlowContext, record_stage_cost
from kensa.flows.config import load_project_config
from kensa.flows.distributed import processes_for
from kensa.flows.gate import GateFailedError, evaluate_gate
from kensa.flows.ledger import attach_model_version
from kensa.flows.register import register_candidate
from kensa.flows.retrain_inputs import Champion, find_dataset, labelled_reviews, load_champion
from kensa.flows.tasks import log_outcome_task, stage_task
from kensa.flows.tracking import configure_mlflow, ensure_experiment, log_dataset_input
from kensa.models.data.ingest import DatasetVersion, load_dataset
from kensa.models.data.reviewed import LabelledImage, MergeResult, merge_reviewed
from kensa.models.evaluation.side_by_side import (
    EvalSet,
    judge_side_by_side,
    plot_side_by_side,
    side_by_side_markdown,
)
from kensa.settings import Settings

log = logging.getLogger("kensa.flows.retrain")

DEPLOYMENT = "retrain/retrain"  # "<flow name>/<deployment name>" in infra/prefect.yaml
EXPERIMENT = "kensa"
TAG_COMPARISON = "kensa.retrain.comparison"  # model-version tag: candidate vs champion, JSON
TAG_PREFIX = "kensa.retrain."

# In-process callers hand their Settings to the flow here rather than as a flow parameter:
# parameters are stored in Prefect's database, and Settings may hold secrets (store URL, keys).
_SETTINGS: ContextVar[Settings | None] = ContextVar("kensa_retrain_settings", default=None)


# Retried: file and store I/O, and a build that stopped half-way is started over (merge_reviewed).
@task(name="merge-review-labels", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def merge_task(base: DatasetVersion, images: list[LabelledImage], settings: Settings) -> MergeResult:
    """The new dataset version: the base plus every new labelled image (hashed, checked, split)."""
    columns = (TextColumn("new dataset version"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("ingest", total=None)
        return merge_reviewed(
            base,
            images,
            settings.data_dir / "datasets",
            settings,
            progress=lambda done, total: progress.update(bar, completed=done, total=total),
        )


@task(name="compare-with-champion", cache_policy=NO_CACHE)
def compare_task(champion: Path, candidate: Path, sets: list[EvalSet]) -> dict[str, Any]:
    return judge_side_by_side({"champion": champion, "candidate": candidate}, sets)


def _eval_sets(base: DatasetVersion, merged: MergeResult) -> list[EvalSet]:
    old = base.split("test")
    new = merged.reviewed("test")
    return [
        EvalSet(
            "old_test",
            [r.absolute_path for r in old],
            [r.label for r in old],
            f"test split of {base.short_version}, the champion's own data",
        ),
        EvalSet(
            "reviewed",
            [r.absolute_path for r in new],
            [r.label for r in new],
            "recently reviewed parts held out of training",
        ),
    ]


def _context(settings: Settings, config_path: str | None) -> FlowContext:
    config = load_project_config(Path(config_path) if config_path else settings.project_config)
    client = configure_mlflow(settings)
    return FlowContext(settings, config, client, ensure_experiment(settings, EXPERIMENT))


def _record_comparison(ctx: FlowContext, run_id: str, comparison: dict[str, Any], out: Path) -> str:
    for set_name, entry in comparison.items():  # compare.<set>.<model>.<metric>
        ctx.client.log_metric(run_id, f"compare.{set_name}.n", entry["n"])
        for model, values in entry["models"].items():
            for metric, value in values.items():
                ctx.client.log_metric(run_id, f"compare.{set_name}.{model}.{metric}", value)
    ctx.client.log_dict(run_id, comparison, "comparison.json")
    ctx.client.log_artifact(run_id, str(plot_side_by_side(comparison, out / "comparison.png")), "plots")
    table = side_by_side_markdown(comparison)
    ctx.client.log_text(run_id, table, "comparison.md")
    return table


@flow(name="retrain", log_prints=True)
def retrain(
    alert_id: int | None = None,
    reason: str = "operator",
    config_path: str | None = None,
    base_data: str | None = None,
    seed: int = 0,
    registered_by: str = "kensa-retrain",
    target: str | None = None,
) -> dict[str, Any]:
    """Champion's data + review labels → same recipe → compare with the champion → candidate.

    ``base_data`` overrides where the champion's dataset folder is (found through MLflow
    otherwise); ``target`` is the compute target (default: the sweep's).
    """
    logger = get_run_logger()
    settings = _SETTINGS.get() or Settings()  # a deployment run is an entry point of its own
    ctx = _context(settings, config_path)
    name = ctx.config.name
    target = target or ctx.config.sweep.target
    if target not in ctx.config.targets:
        raise ValueError(f"target {target!r} is not a compute target; known: {sorted(ctx.config.targets)}")
    tags = {
        "kensa.stage": "retrain",
        f"{TAG_PREFIX}reason": reason[:500],
        f"{TAG_PREFIX}alert_id": str(alert_id) if alert_id is not None else "",
        f"{TAG_PREFIX}flow_run_id": str(prefect_flow_run.id or ""),
        "kensa.target": target,
    }
    # nested: inside a caller's active MLflow run (a drift check that logs its reports) this run
    # becomes its child instead of failing with "run already active".
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="retrain", tags=tags, nested=True) as run:
        run_id = run.info.run_id
        root = settings.data_dir / "runs" / run_id
        champion = load_champion(ctx.client, name, root / "champion")
        base_root = (
            Path(base_data).resolve()
            if base_data
            else find_dataset(ctx.client, champion, [ctx.experiment_id])
        )
        base = load_dataset(base_root)
        if base.version != champion.dataset_version:
            logger.warning(
                "base data %s is version %s, not %s that champion %s was trained on",
                base_root,
                base.short_version,
                champion.dataset_version[:12],
                champion.version,
            )
        images, skipped = labelled_reviews(settings)
        merged = merge_task(base, images, settings)
        skipped = {**skipped, **merged.skipped}
        ds = merged.dataset
        logger.info(
            "dataset %s = %s + %d reviewed images (%s left out: %s)",
            ds.short_version,
            base.short_version,
            len(merged.added),
            sum(skipped.values()),
            skipped,
        )
        if not merged.added:
            logger.warning(
                "no new labelled review items: the candidate learns from the same data as champion %s",
                champion.version,
            )
        mlflow.set_tags(
            {
                "kensa.dataset_version": ds.version,
                f"{TAG_PREFIX}base_dataset_version": base.version,
                f"{TAG_PREFIX}champion_version": champion.version,
                f"{TAG_PREFIX}new_labels": str(len(merged.added)),
            }
        )
        mlflow.log_params(
            {
                "seed": seed,
                "retrain.new_labels": len(merged.added),
                "retrain.skipped": json.dumps(skipped, sort_keys=True),
            }
        )
        log_dataset_input(ds.root, ds.version, name=f"line-{ds.short_version}")
        log_dataset_input(base.root, base.version, name=f"line-{base.short_version}", context="base")
        outcome = stage_task(
            ds.root,
            root / "candidate",
            champion.recipe(seed=seed, device=ctx.config.targets[target].device),
            ctx.policy,
            None,
            ctx.config.serving.batch_size,
            ctx.config.sweep.max_robustness_images,
            processes_for(ctx.config.targets[target]),
            mlflow_run_id=run_id,
        )
        log_outcome_task(ctx.client, run_id, outcome)
        cost = record_stage_cost(ctx, run_id, "retrain", target, outcome.seconds)
        comparison = compare_task(champion.onnx_path, outcome.onnx_path, _eval_sets(base, merged))
        table = _record_comparison(ctx, run_id, comparison, root)
        gate = evaluate_gate(outcome.metrics, ctx.config.kpi)
        mlflow.set_tags(
            {"kensa.gate": "passed" if gate.passed else "failed", "kensa.gate.message": gate.message()[:5000]}
        )
        mlflow.log_dict(gate.to_dict(), "kpi_gate.json")
        create_markdown_artifact(
            f"## Retrained candidate vs champion {champion.version}\n\n{table}\n\n"
            + gate.markdown("KPI gate"),
            key="retrain-comparison",
            description=f"{reason}; {len(merged.added)} new labels",
        )
        if not gate.passed:
            raise GateFailedError(gate.message() + " — the retrained model is not registered.")
        registered = _register(
            ctx,
            champion,
            outcome,
            cost.cost,
            comparison,
            gate.to_dict(),
            registered_by=registered_by,
            alert_id=alert_id,
            reason=reason,
            new_labels=len(merged.added),
            base=base,
        )
        mlflow.set_tag("kensa.model_version", registered)
    attach_model_version(settings, [run_id], registered)
    logger.info(
        "candidate %s version %s registered (champion %s unchanged); approve with: "
        "kensa approve %s --by NAME --reason TEXT",
        name,
        registered,
        champion.version,
        registered,
    )
    return {
        "run_id": run_id,
        "model_name": name,
        "model_version": registered,
        "champion_version": champion.version,
        "dataset_version": ds.version,
        "dataset_root": str(ds.root),
        "base_dataset_version": base.version,
        "new_labels": len(merged.added),
        "skipped": skipped,
        "comparison": comparison,
        "gate": gate.to_dict(),
    }


def _register(
    ctx: FlowContext,
    champion: Champion,
    outcome: Any,
    training_cost: float,
    comparison: dict[str, Any],
    gate: dict[str, Any],
    *,
    registered_by: str,
    alert_id: int | None,
    reason: str,
    new_labels: int,
    base: DatasetVersion,
) -> str:
    registered = register_candidate(
        outcome.onnx_path,
        champion.name,
        registered_by=registered_by,
        source="retrain",
        kpi={
            "passed": gate["passed"],
            "escape_rate": outcome.metrics["escape_rate"],
            "false_reject_rate": outcome.metrics["false_reject_rate"],
            "automation_rate": outcome.metrics["automation_rate"],
        },
        cost={"training": training_cost, "currency": ctx.config.currency},
        parity=outcome.parity,
        settings=ctx.settings,
    )
    # The comparison rides on the version itself, where the person approving it looks.
    compact = {s: {"n": e["n"], **e["models"]} for s, e in comparison.items()}
    tags = {
        TAG_COMPARISON: json.dumps(compact, sort_keys=True, separators=(",", ":"))[:5000],
        f"{TAG_PREFIX}champion_version": champion.version,
        f"{TAG_PREFIX}base_dataset_version": base.version,
        f"{TAG_PREFIX}new_labels": str(new_labels),
        f"{TAG_PREFIX}reason": reason[:500],
        f"{TAG_PREFIX}alert_id": str(alert_id) if alert_id is not None else "",
        f"{TAG_PREFIX}flow_run_id": str(prefect_flow_run.id or ""),
    }
    for key, value in tags.items():
        ctx.client.set_model_version_tag(champion.name, registered.version, key, value)
    return registered.version


def start_retraining(settings: Settings, *, alert_id: int | None, reason: str) -> str:
    """Start the `retrain` flow; returns its Prefect flow-run id.

    With a Prefect server configured (``KENSA_PREFECT_API_URL``) that has the ``retrain/retrain``
    deployment, the run is scheduled there for a worker and this returns at once. Otherwise the
    flow runs here, to the end, before this returns (a failed run is logged, its id returned).
    """
    parameters: dict[str, Any] = {"alert_id": alert_id, "reason": reason}
    if settings.prefect_api_url and _deployment_exists():
        from prefect.client.schemas.objects import FlowRun
        from prefect.deployments import run_deployment

        scheduled = run_deployment(DEPLOYMENT, parameters=parameters, timeout=0)
        assert isinstance(scheduled, FlowRun)  # a coroutine only when called from async code
        log.info(
            "retrain_scheduled",
            extra={"flow_run": str(scheduled.id), "deployment": DEPLOYMENT, "alert_id": alert_id},
        )
        return str(scheduled.id)
    token = _SETTINGS.set(settings)
    try:
        state = retrain(**parameters, return_state=True)
    finally:
        _SETTINGS.reset(token)
    flow_run_id = str(state.state_details.flow_run_id)
    if state.is_completed():
        log.info("retrain_completed", extra={"flow_run": flow_run_id, "alert_id": alert_id})
    else:
        log.error(
            "retrain_failed",
            extra={
                "flow_run": flow_run_id,
                "alert_id": alert_id,
                "state": state.type.value,
                "state_message": state.message,
            },
        )
    return flow_run_id


def _deployment_exists() -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            log.warning("retrain_in_process", extra={"reason": "no_deployment", "deployment": DEPLOYMENT})
            return False
    return True
