"""Prefect flow `sweep`: model sizes × fine-tuning rungs × data fractions, robustness, cost; one candidate.

Each trial is a nested MLflow run with clean and corrupted metrics, its training cost and its
measured inference latency (→ serving cost per million parts). Error-vs-parameters and
error-vs-data curves are fitted for clean and corrupted error; the configuration with the lowest
TCO that meets the KPI on corrupted data is registered as ``candidate``. A grid point whose stage
already ran in this top-level flow run (the pilot's, when the pilot is one point of the grid)
comes back from Prefect's cache of that stage: it is neither trained nor paid for again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from kensa.flows.choose import Trial, choose, tco
from kensa.flows.common import (
    FlowContext,
    flow_context,
    planned_parts_millions,
    record_stage_cost,
    serving_cost_per_million,
    write_json,
)
from kensa.flows.compute import Estimate, check_budget, estimate_training, place_trials
from kensa.flows.config import Sweep
from kensa.flows.distributed import processes_for
from kensa.flows.gate import GateFailedError, corrupted_escape, evaluate_gate
from kensa.flows.ledger import LedgerLine, attach_model_version, read_ledger
from kensa.flows.register import register_candidate
from kensa.flows.stages import StageOutcome
from kensa.flows.sweep_plots import plot_cost_frontier, plot_scaling
from kensa.flows.tasks import log_outcome_task, reused_from, stage_task
from kensa.flows.tracking import log_dataset_input
from kensa.models.data.ingest import load_dataset
from kensa.models.evaluation.scaling import effective_robustness, fit_power_law
from kensa.models.nets.zoo import is_pretrained
from kensa.models.train.anomaly import ANOMALY_MODEL
from kensa.models.train.feature_cache import feature_cache_dir
from kensa.models.train.speed import measure_train_speed
from kensa.models.train.trainer import TrainConfig, dataset_image_size

Point = tuple[str, str | None, float]  # model, finetune rung (None: from scratch), data fraction


def sweep_grid(s: Sweep) -> list[tuple[str, Point]]:
    """Every trial of the sweep as (key, point): models × their rungs × data fractions.

    A pretrained model is swept at each rung of ``finetunes``; a from-scratch model at its only one.
    The key names the rung only where a model has several: ``efficientnet_lite0/last@0.5``.
    """
    grid: list[tuple[str, Point]] = []
    for model in s.models:
        rungs: list[str | None] = list(s.finetunes_for(True)) if is_pretrained(model) else [None]
        for rung in rungs:
            recipe = f"{model}/{rung}" if len(rungs) > 1 else model
            grid += [(f"{recipe}@{f:g}", (model, rung, f)) for f in s.fractions]
    return grid


@task(name="estimate-sweep-cost", cache_policy=NO_CACHE)
def estimate_sweep(ctx: FlowContext, data_root: Path) -> list[Estimate]:
    """Price every trial on the target it will run on; refuse the sweep if over budget."""
    ds = load_dataset(data_root)
    s = ctx.config.sweep
    size = s.image_size or dataset_image_size(ds)
    grid = sweep_grid(s)
    targets = place_trials(len(grid), ctx.config)
    recipes = dict.fromkeys((m, r) for _, (m, r, _f) in grid)  # timed once, not once per fraction
    speeds = {(m, r): measure_train_speed(m, size, len(ds.classes), r) for m, r in recipes}
    n_train = len(ds.split("train"))
    estimates = []
    for (key, (m, r, f)), t in zip(grid, targets, strict=True):
        n = round(n_train * f)
        rate = speeds[(m, r)].effective_rate(n, s.epochs)
        estimates.append(estimate_training(f"sweep:{key}", t, ctx.config, n * s.epochs, rate, s.budget))
    check_budget(estimates, s.budget, ctx.config.currency)
    return estimates


def _fits(trials: list[Trial]) -> dict[str, Any]:
    top = max(t.fraction for t in trials)
    # A memory bank is not a model size: anomaly trials stay off the error-vs-parameters curve
    # (their error is defect-vs-good, a classifier's is over defect types) but keep their own
    # error-vs-data curve and their place in the table, the choice and the frontier.
    by_size = sorted(
        (t for t in trials if t.fraction == top and t.model != ANOMALY_MODEL), key=lambda t: t.parameters
    )
    fits: dict[str, Any] = {
        "error_vs_parameters": {
            "clean": fit_power_law(
                [t.parameters for t in by_size], [t.clean_error for t in by_size]
            ).to_dict(),
            "corrupted": fit_power_law(
                [t.parameters for t in by_size], [t.corrupted_error for t in by_size]
            ).to_dict(),
        },
        "error_vs_data": {},
    }
    for model in sorted({t.model for t in trials}):
        pts = sorted((t for t in trials if t.model == model), key=lambda t: t.train_images)
        fits["error_vs_data"][model] = {
            "clean": fit_power_law([t.train_images for t in pts], [t.clean_error for t in pts]).to_dict(),
            "corrupted": fit_power_law(
                [t.train_images for t in pts], [t.corrupted_error for t in pts]
            ).to_dict(),
        }
    er = effective_robustness([t.clean_error for t in trials], [t.corrupted_error for t in trials])
    fits["effective_robustness"] = {**er, "trials": [t.key for t in trials]}
    return fits


def _table(trials: list[Trial], chosen: Trial | None, currency: str) -> str:
    lines = [
        "| trial | target | params | clean err | corrupted err | corrupted escape | "
        f"train cost ({currency}) | serve /M parts | TCO | KPI |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        mark = " **chosen**" if chosen and t.key == chosen.key else ""
        lines.append(
            f"| {t.key}{mark} | {t.target} | {t.parameters / 1e6:.1f}M | {t.clean_error:.3f} | "
            f"{t.corrupted_error:.3f} | {t.corrupted_escape_rate:.2%} | {t.training_cost:.3f} | "
            f"{t.serving_cost_per_million:.3f} | {t.tco:.2f} | {'✅' if t.meets_kpi else '❌'} |"
        )
    return "\n".join(lines)


@flow(name="sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def sweep(
    data: str,
    config_path: str | None = None,
    reference_dir: str | None = None,
    out_dir: str | None = None,
    seed: int = 0,
    parent_run_id: str | None = None,
    registered_by: str = "kensa-sweep",
    source: str = "sweep",
) -> dict[str, Any]:
    """Run the grid, fit the curves, choose by TCO under the corrupted-data KPI, register it.

    A grid point whose stage already ran with the same recipe in this top-level flow run (the
    pilot, usually) is Prefect's cached result of that stage: its trial records the run that
    trained it (``kensa.reused_from``) and what that run paid, and trains nothing.
    """
    logger = get_run_logger()
    ctx = flow_context(config_path)
    s = ctx.config.sweep
    data_root = Path(data).resolve()
    ds = load_dataset(data_root)
    estimates = estimate_sweep(ctx, data_root)
    logger.info(
        "sweep estimate: %.2f %s for %d trials (budget %.2f)",
        sum(e.cost for e in estimates),
        ctx.config.currency,
        len(estimates),
        s.budget,
    )
    tags = {"kensa.stage": "sweep", "kensa.dataset_version": ds.version}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    reference = Path(reference_dir) if reference_dir else None
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="sweep", tags=tags) as run:
        sweep_run = run.info.run_id
        root = Path(out_dir) if out_dir else ctx.settings.data_dir / "runs" / sweep_run
        mlflow.log_params(
            {
                "sweep.models": ",".join(s.models),
                "sweep.fractions": ",".join(map(str, s.fractions)),
                "sweep.finetunes": ",".join(s.finetunes),
                "sweep.epochs": s.epochs,
                "sweep.budget": s.budget,
            }
        )
        log_dataset_input(data_root, ds.version, name=f"line-{ds.short_version}")
        grid = sweep_grid(s)
        runs: dict[str, tuple[str, str]] = {}
        stages: dict[str, dict[str, Any]] = {}
        futures = {}
        for (key, (model, rung, fraction)), est in zip(grid, estimates, strict=True):
            tags = {
                "mlflow.parentRunId": sweep_run,
                "kensa.stage": "sweep-trial",
                "kensa.target": est.target,
            }
            child = ctx.client.create_run(ctx.experiment_id, run_name=key, tags=tags)
            runs[key] = (child.info.run_id, est.target)
            cfg = TrainConfig(
                model=model,
                epochs=s.epochs,
                fraction=fraction,
                seed=seed,
                device=ctx.config.targets[est.target].device,
                finetune=rung,
                **s.recipe_fields(),  # type: ignore[arg-type]
            )
            stages[key] = {
                "data_root": data_root,
                "out_dir": root / key.replace("@", "_f").replace("/", "-"),
                "train_config": cfg,
                "policy": ctx.policy,
                "reference": reference,
                "serving_batch": ctx.config.serving.batch_size,
                "max_robustness_images": s.max_robustness_images,
                "nproc": processes_for(ctx.config.targets[est.target]),
                "cache_dir": feature_cache_dir(ctx.settings),
            }
            # A point already trained in this flow run (the pilot's) resolves from Prefect's cache.
            futures[key] = stage_task.submit(**stages[key], mlflow_run_id=child.info.run_id)
        trials: list[Trial] = []
        outcomes: dict[str, StageOutcome] = {}
        for key in runs:
            run_id, target = runs[key]
            outcome = futures[key].result()
            trained_by = reused_from(outcome, run_id)
            if trained_by and outcome.train.get("stopped_early", False):
                # Cut short by the pilot's time budget: not this point's recipe. Train it in full.
                logger.info("trial %s: run %s stopped early; training it in full", key, trained_by)
                refresh = stage_task.with_options(refresh_cache=True)
                outcome = refresh.submit(**stages[key], mlflow_run_id=run_id).result()
                trained_by = None
            outcomes[key] = outcome
            log_outcome_task(ctx.client, run_id, outcome)
            if trained_by:  # already on the ledger under the run that trained it
                logger.info("trial %s reuses run %s, which trained this exact recipe", key, trained_by)
                ctx.client.set_tag(run_id, "kensa.reused_from", trained_by)
                paid = sum(line.cost for line in read_ledger(ctx.settings) if line.run_id == trained_by)
                cost = LedgerLine(run_id, "sweep", target, None, 0.0, paid, ctx.config.currency)
            else:
                cost = record_stage_cost(ctx, run_id, "sweep", target, outcome.seconds)
            gate = evaluate_gate(outcome.metrics, ctx.config.kpi, check_relative_ce=True)
            serve = serving_cost_per_million(ctx, outcome.latency_ms_per_image)
            rob = outcome.metrics["robustness"]
            trial = Trial(
                key=key,
                model=key.rsplit("@", 1)[0],  # the recipe: fits and curves are drawn per recipe
                fraction=outcome.fraction,
                parameters=outcome.parameters,
                train_images=outcome.train_images,
                clean_error=outcome.metrics["error"],
                corrupted_error=rob["corrupted_error"],
                escape_rate=outcome.metrics["escape_rate"],
                corrupted_escape_rate=corrupted_escape(rob, ctx.config.kpi.corruption_severity),
                training_cost=cost.cost,
                serving_cost_per_million=serve,
                tco=tco(cost.cost, serve, planned_parts_millions(ctx)),
                meets_kpi=gate.passed,
                gaps=tuple(gate.gaps),
                target=target,
                run_id=run_id,
            )
            ctx.client.log_metric(run_id, "cost.serving_per_million", serve)
            ctx.client.log_metric(run_id, "cost.tco", trial.tco)
            ctx.client.set_tag(run_id, "kensa.gate", "passed" if gate.passed else "failed")
            ctx.client.set_terminated(run_id)
            trials.append(trial)
        chosen = choose(trials)
        fits = _fits(trials)
        mlflow.log_dict(
            {
                "trials": [t.to_dict() for t in trials],
                "fits": fits,
                "chosen": chosen.key if chosen else None,
            },
            "sweep.json",
        )
        write_json(root / "sweep.json", {"trials": [t.to_dict() for t in trials], "fits": fits})
        scaling_png = plot_scaling(trials, fits, root / "scaling_curves.png")
        frontier_png = plot_cost_frontier(trials, chosen, root / "cost_frontier.png")
        mlflow.log_artifact(str(scaling_png), "plots")
        mlflow.log_artifact(str(frontier_png), "plots")
        table = _table(trials, chosen, ctx.config.currency)
        create_markdown_artifact(
            "## Scale sweep\n\n" + table + f"\n\nScaling curves: `{scaling_png}`\n"
            f"Cost frontier: `{frontier_png}`",
            key="scale-sweep",
            description="trials, costs and the chosen configuration",
        )
        if chosen is None:
            best = min(trials, key=lambda t: len(t.gaps))
            mlflow.set_tag("kensa.sweep.outcome", "no trial met the KPI")
            msg = (
                "no sweep trial met the KPI on corrupted data; nothing registered. Closest: "
                f"{best.key}: " + "; ".join(best.gaps)
            )
            raise GateFailedError(msg)
        mlflow.set_tags({"kensa.sweep.chosen": chosen.key, "kensa.sweep.chosen_run": chosen.run_id})
        outcome_dir = outcomes[chosen.key].run_dir  # the pilot's folder when its trial was reused
        registered = register_candidate(
            outcome_dir / "model.onnx",
            ctx.config.name,
            registered_by=registered_by,
            source=source,
            kpi={
                "passed": True,
                "trial": chosen.key,
                "escape_rate": chosen.escape_rate,
                "corrupted_escape_rate": chosen.corrupted_escape_rate,
            },
            cost={
                "training": chosen.training_cost,
                "serving_per_million": chosen.serving_cost_per_million,
                "tco": chosen.tco,
                "currency": ctx.config.currency,
            },
            parity=_read_json(outcome_dir / "model.parity.json"),
            settings=ctx.settings,
        )
        mlflow.set_tag("kensa.model_version", registered.version)
    ids = [sweep_run, *(r for r, _ in runs.values())] + ([parent_run_id] if parent_run_id else [])
    attach_model_version(ctx.settings, ids, registered.version)
    logger.info(
        "candidate %s version %s from %s (TCO %.2f %s)",
        registered.name,
        registered.version,
        chosen.key,
        chosen.tco,
        ctx.config.currency,
    )
    return {
        "sweep_run_id": sweep_run,
        "chosen": chosen.to_dict(),
        "trials": [t.to_dict() for t in trials],
        "fits": fits,
        "model_name": registered.name,
        "model_version": registered.version,
        "scaling_plot": str(scaling_png),
        "frontier_plot": str(frontier_png),
    }


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return dict(json.loads(path.read_text()))
