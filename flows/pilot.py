"""Prefect flow `pilot`: the smallest model on a small subset under a fixed budget, then the KPI gate.

A passed gate hands over to the scale sweep (``flows/sweep.py``); a failed gate stops the flow
before any scale spend, with the gap in the message, in MLflow tags and in a Prefect artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from kensa.flows.common import FlowContext, flow_context, record_stage_cost
from kensa.flows.compute import check_budget, estimate_training
from kensa.flows.distributed import processes_for
from kensa.flows.gate import GateFailedError, evaluate_gate
from kensa.flows.tasks import log_outcome_task, stage_task
from kensa.flows.tracking import log_dataset_input
from kensa.models.data.ingest import load_dataset
from kensa.models.nets.zoo import is_pretrained
from kensa.models.train.feature_cache import feature_cache_dir
from kensa.models.train.speed import measure_train_speed
from kensa.models.train.trainer import TrainConfig, dataset_image_size


@task(name="estimate-pilot-cost", cache_policy=NO_CACHE)
def estimate_pilot(ctx: FlowContext, data_root: Path) -> dict[str, Any]:
    """Measure this machine's training speed for the pilot model and price the stage."""
    ds = load_dataset(data_root)
    p = ctx.config.pilot
    size = p.image_size or dataset_image_size(ds)
    speed = measure_train_speed(
        p.model, size, len(ds.classes), p.finetune, ctx.config.targets[p.target].device
    )
    n = round(len(ds.split("train")) * p.fraction)
    rate = speed.effective_rate(n, p.epochs)
    est = estimate_training("pilot", p.target, ctx.config, n * p.epochs, rate, p.budget)
    check_budget([est], p.budget, ctx.config.currency)
    return {"estimate": est, "explain": est.explain(ctx.config.currency)}


@flow(name="pilot", log_prints=True)
def pilot(
    data: str,
    config_path: str | None = None,
    out_dir: str | None = None,
    seed: int = 0,
    continue_to_sweep: bool = True,
    registered_by: str = "kensa-pilot",
    wait_for_approval: bool = False,
) -> dict[str, Any]:
    """Pilot → KPI gate → (scale sweep → candidate). Returns what happened, for the CLI."""
    logger = get_run_logger()
    ctx = flow_context(config_path)
    data_root = Path(data).resolve()
    ds = load_dataset(data_root)
    p = ctx.config.pilot
    estimate = estimate_pilot(ctx, data_root)
    logger.info("cost estimate: %s", estimate["explain"])

    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="pilot") as run:
        run_id = run.info.run_id
        root = Path(out_dir) if out_dir else ctx.settings.data_dir / "runs" / run_id
        mlflow.set_tags(
            {"kensa.stage": "pilot", "kensa.target": p.target, "kensa.dataset_version": ds.version}
        )
        mlflow.log_params(
            {
                "pilot.model": p.model,
                "pilot.fraction": p.fraction,
                "pilot.epochs": p.epochs,
                "pilot.budget": p.budget,
                "seed": seed,
            }
        )
        log_dataset_input(data_root, ds.version, name=f"line-{ds.short_version}")
        train_config = TrainConfig(
            model=p.model,
            epochs=p.epochs,
            fraction=p.fraction,
            seed=seed,
            device=ctx.config.targets[p.target].device,
            max_minutes=p.max_minutes,
            # Spelled out for a pretrained model (its default is "head"), so the sweep's grid
            # point with the same recipe is the same cache key.
            finetune=p.finetune or ("head" if is_pretrained(p.model) else None),
            **p.recipe_fields(),  # type: ignore[arg-type]
        )
        outcome = stage_task(
            data_root,
            root / "pilot",
            train_config,
            ctx.policy,
            None,
            ctx.config.serving.batch_size,
            ctx.config.sweep.max_robustness_images,
            processes_for(ctx.config.targets[p.target]),
            mlflow_run_id=run_id,
            cache_dir=feature_cache_dir(ctx.settings),
        )
        log_outcome_task(ctx.client, run_id, outcome)
        cost = record_stage_cost(ctx, run_id, "pilot", p.target, outcome.seconds)
        gate = evaluate_gate(outcome.metrics, ctx.config.kpi)
        mlflow.set_tags(
            {
                "kensa.gate": "passed" if gate.passed else "failed",
                "kensa.gate.message": gate.message()[:5000],
            }
        )
        mlflow.log_dict(gate.to_dict(), "kpi_gate.json")
        create_markdown_artifact(
            gate.markdown("Pilot KPI gate"),
            key="pilot-kpi-gate",
            description=f"pilot {p.model} on {p.fraction:.0%} of the data",
        )
        summary: dict[str, Any] = {
            "pilot_run_id": run_id,
            "pilot_dir": str(outcome.run_dir),
            "gate": gate.to_dict(),
            "pilot_cost": cost.cost,
            "currency": ctx.config.currency,
            "pilot_metrics": {
                k: outcome.metrics[k] for k in ("escape_rate", "false_reject_rate", "automation_rate")
            },
        }
        if not gate.passed:
            logger.error(gate.message())
            raise GateFailedError(
                gate.message() + " — stopped before the scale sweep; no scale spend was made."
            )
        logger.info(gate.message())

    if continue_to_sweep:
        from kensa.flows.sweep import sweep

        # The pilot is one point of the sweep's grid when its recipe matches one exactly: the
        # sweep's stage for that point is then Prefect's cached result of the pilot's stage
        # (kensa.flows.tasks.stage_cache_key), neither trained nor paid for a second time.
        summary["sweep"] = sweep(
            data=str(data_root),
            config_path=config_path,
            reference_dir=str(outcome.run_dir),
            out_dir=str(root / "sweep"),
            seed=seed,
            parent_run_id=run_id,
            registered_by=registered_by,
        )
        if wait_for_approval:
            from kensa.flows.approval import wait_for_approval as wait

            summary["approval"] = wait(
                summary["sweep"]["model_name"],
                summary["sweep"]["model_version"],
                ctx.config.approval,
                ctx.settings,
            )
    return summary
