"""Prefect tasks shared by the training flows: one stage (train, evaluate, export), its MLflow record.

A stage's result is cached by Prefect under what defines it (see :func:`stage_cache_key`), so a
stage that already ran with the same recipe on the same data in the same top-level flow run is
not trained again: the pilot is one point of the sweep's grid, and the sweep takes it over.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from kensa.flows.common import log_outcome
from kensa.flows.stages import StageOutcome, run_stage
from kensa.models.data.ingest import load_dataset
from kensa.models.evaluation.evaluate_run import BandPolicy
from kensa.models.train.trainer import TrainConfig

# Where and how long a stage may run, not what it learns: left out of the cache key, as are the
# output folder, the relative-CE reference (it only adds rCE to the metrics) and the process count.
_NOT_THE_RECIPE = frozenset({"device", "max_minutes"})
TRAINED_FOR = "mlflow_run_id"  # StageOutcome.extra key: the MLflow run the stage was trained for


def stage_cache_key(context: TaskRunContext, inputs: dict[str, Any]) -> str | None:
    """The stage's identity: data version, training recipe and evaluation settings, per root run.

    The root (outermost) flow run scopes the key: a pilot's sweep reuses the pilot's stage, but a
    later pilot on the same data trains again, as a person who starts it expects.
    """
    from prefect.runtime import flow_run

    root = flow_run.root_flow_run_id
    if not root:  # a task called outside any flow run: nothing to scope a cache to
        return None
    config: TrainConfig = inputs["train_config"]
    recipe = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _NOT_THE_RECIPE}
    # The rung trained, not how it was asked for: a pilot left at the model's default (None) and a
    # sweep point naming that default ("head") are one recipe.
    recipe["finetune"] = config.resolved_finetune()
    policy: BandPolicy = inputs["policy"]
    return hash_objects(
        "kensa-stage/1",
        str(root),
        load_dataset(Path(inputs["data_root"])).version,
        recipe,
        asdict(policy),
        inputs["serving_batch"],
        inputs["max_robustness_images"],
        raise_on_failure=True,
    )


@task(
    name="train-evaluate-export",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=stage_cache_key),
    # Cached across flow runs (the sweep is a flow run of its own): the result must be stored,
    # in Prefect's local result storage (PREFECT_HOME/storage).
    persist_result=True,
)
def stage_task(
    data_root: Path,
    out_dir: Path,
    train_config: TrainConfig,
    policy: BandPolicy,
    reference: Path | None,
    serving_batch: int,
    max_robustness_images: int,
    nproc: int = 1,
    mlflow_run_id: str | None = None,
    cache_dir: Path | None = None,
) -> StageOutcome:
    """One stage (train → evaluate with corruptions → export with parity → latency).

    ``mlflow_run_id`` (not part of the cache key) is recorded in ``extra[TRAINED_FOR]``, so a
    caller that gets the result from the cache knows which run trained and paid for it.
    """
    outcome = run_stage(
        data_root,
        out_dir,
        train_config,
        policy,
        reference,
        serving_batch,
        max_robustness_images,
        show_progress=True,
        nproc=nproc,
        cache_dir=cache_dir,  # frozen-backbone maps, shared by every stage on this dataset version
    )
    outcome.extra[TRAINED_FOR] = mlflow_run_id
    return outcome


def reused_from(outcome: StageOutcome, run_id: str) -> str | None:
    """The MLflow run that trained ``outcome`` when it was not ``run_id`` (a cache hit), else None."""
    trained_for = outcome.extra.get(TRAINED_FOR)
    return str(trained_for) if trained_for and trained_for != run_id else None


@task(name="log-stage-to-mlflow", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def log_outcome_task(client: MlflowClient, run_id: str, outcome: StageOutcome) -> None:
    """Metrics, parameters and artifacts of a stage on its MLflow run (idempotent, so retried)."""
    log_outcome(client, run_id, outcome)
