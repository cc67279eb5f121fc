"""Multi-device training: a target with more than one GPU trains under `torchrun` (DDP)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from kensa.flows.config import ComputeTarget
from kensa.models.train.trainer import TrainConfig


def processes_for(target: ComputeTarget) -> int:
    """One process per GPU; a CPU target runs one process unless it names ``gpus`` (gloo test)."""
    return max(1, target.gpus)


def torchrun_command(data_root: Path, config: TrainConfig, out_dir: Path, nproc: int) -> list[str]:
    """The exact command a work pool's job runs: ``torchrun`` over ``kensa train``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "kensa.cli.main",
        "train",
        "--data",
        str(data_root),
        "--out",
        str(out_dir),
    ]
    values = asdict(config)
    for key in ("model", "epochs", "fraction", "seed", "device", "batch_size", "lr"):
        cmd += [f"--{key.replace('_', '-')}", str(values[key])]
    if config.weights:
        cmd += ["--weights", config.weights]
    if config.max_minutes:
        cmd += ["--max-minutes", str(config.max_minutes)]
    if config.finetune:
        cmd += ["--finetune", config.finetune]
    return cmd


def train_distributed(data_root: Path, config: TrainConfig, out_dir: Path, nproc: int) -> Path:
    """Run DDP training in child processes; rank 0 writes ``out_dir/checkpoint.pt``."""
    env = dict(os.environ)
    # Each rank gets its share of the cores; oversubscribing a CPU host slows every rank.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.run(
        torchrun_command(data_root, config, out_dir, nproc),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        msg = f"distributed training failed (exit {proc.returncode}):\n{tail}"
        raise RuntimeError(msg)
    return out_dir / "checkpoint.pt"
