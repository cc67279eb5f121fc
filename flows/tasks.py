"""Prefect tasks shared by the training flows: one stage (train, evaluate, export) as a task."""

from __future__ import annotations

from pathlib import Path

from kensa.flows.stages import StageOutcome, run_stage
from kensa.models.evaluation.evaluate_run import BandPolicy
from kensa.models.train.trainer import TrainConfig
from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="train-evaluate-export", cache_policy=NO_CACHE)
def stage_task(
    data_root: Path,
    out_dir: Path,
    train_config: TrainConfig,
    policy: BandPolicy,
    reference: Path | None,
    serving_batch: int,
    max_robustness_images: int,
    nproc: int = 1,
) -> StageOutcome:
    """One stage (train → evaluate with corruptions → export with parity → latency)."""
    return run_stage(
        data_root,
        out_dir,
        train_config,
        policy,
        reference,
        serving_batch,
        max_robustness_images,
        show_progress=True,
        nproc=nproc,
    )
