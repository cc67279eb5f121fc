"""One training stage as plain function calls: train → evaluate (with corruptions) → export → latency.

The pilot and every sweep trial run exactly this; Prefect tasks and ``bench/flows.py`` wrap it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kensa.models.evaluation.evaluate_anomaly import evaluate_anomaly_run
from kensa.models.evaluation.evaluate_run import BandPolicy, evaluate_run
from kensa.models.nets.patchcore import PatchCoreConfig
from kensa.models.onnx.anomaly import export_anomaly_run
from kensa.models.onnx.export import cpu_session, export_run
from kensa.models.train.anomaly import ANOMALY_MODEL, fit_anomaly_run, load_anomaly_run
from kensa.models.train.trainer import TrainConfig, TrainResult, train


@dataclass
class StageOutcome:
    """Everything a stage produced that flows record, gate and compare."""

    model: str
    fraction: float
    run_dir: Path
    onnx_path: Path
    parameters: int
    train_images: int
    train: dict[str, Any]
    metrics: dict[str, Any]
    parity: dict[str, Any]
    seconds: float
    latency_ms_per_image: float  # ONNX Runtime, CPU, at the serving batch size
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        d["onnx_path"] = str(self.onnx_path)
        return d


def load_train_result(run_dir: Path) -> TrainResult:
    """The TrainResult a (possibly distributed) run wrote to ``train.json``."""
    raw = json.loads((run_dir / "train.json").read_text())
    raw["run_dir"], raw["checkpoint"] = Path(raw["run_dir"]), Path(raw["checkpoint"])
    return TrainResult(**raw)


def measure_latency(onnx_path: Path, input_size: int, batch: int, repeats: int = 5) -> float:
    """Milliseconds per image of the exported model at ``batch`` (median of ``repeats``)."""
    sess = cpu_session(onnx_path)
    x = np.random.default_rng(0).integers(0, 256, (batch, input_size, input_size, 3), np.uint8)
    sess.run(["probs"], {"images": x})  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(["probs"], {"images": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0 / batch


def run_stage(
    data_root: Path,
    out_dir: Path,
    config: TrainConfig,
    policy: BandPolicy,
    reference: Path | None = None,
    serving_batch: int = 8,
    max_robustness_images: int = 192,
    show_progress: bool = True,
    nproc: int = 1,
    cache_dir: Path | None = None,
) -> StageOutcome:
    """Train, evaluate like a QC lead (with the corruption suite), export with parity, time it.

    ``nproc`` > 1 trains under ``torchrun`` (DDP, one process per device); the rest runs here.
    ``cache_dir`` keeps frozen-backbone maps for finetune head/last, shared by every stage on the
    same data (``kensa.models.train.feature_cache.feature_cache_dir(settings)``).
    """
    if config.model == ANOMALY_MODEL:
        return run_anomaly_stage(
            data_root, out_dir, config, policy, serving_batch, max_robustness_images, show_progress
        )
    t0 = time.perf_counter()
    if nproc > 1:
        from kensa.flows.distributed import train_distributed

        train_distributed(data_root, config, out_dir, nproc)
        result = load_train_result(out_dir)
    else:
        result = train(data_root, config, out_dir, show_progress=show_progress, cache_dir=cache_dir)
    metrics = evaluate_run(
        out_dir,
        data_root,
        corruptions=True,
        policy=policy,
        reference=reference,
        max_robustness_images=max_robustness_images,
        show_progress=show_progress,
    )
    exported = export_run(out_dir, out_dir / "model.onnx")
    latency = measure_latency(exported.path, int(exported.metadata["input_size"]), serving_batch)
    return StageOutcome(
        model=config.model,
        fraction=config.fraction,
        run_dir=out_dir,
        onnx_path=exported.path,
        parameters=result.parameters,
        train_images=result.train_images,
        train=result.to_dict(),
        metrics=metrics,
        parity=exported.parity,
        seconds=time.perf_counter() - t0,
        latency_ms_per_image=latency,
    )


def run_anomaly_stage(
    data_root: Path,
    out_dir: Path,
    config: TrainConfig,
    policy: BandPolicy,
    serving_batch: int = 8,
    max_robustness_images: int = 192,
    show_progress: bool = True,
) -> StageOutcome:
    """The same stage for PatchCore: fit on good parts, evaluate (corruptions too), export, time it.

    Epochs, learning rate and fine-tuning rungs do not apply: the fit is one pass over the good
    training parts (``config.fraction`` of them) and a coreset. ``parameters`` counts the backbone
    taps and the memory bank, which is what the served graph holds.
    """
    if config.roi is not None:
        raise ValueError("patchcore fits whole parts; fit 'roi' is for classifiers")
    t0 = time.perf_counter()
    fit_anomaly_run(
        data_root,
        out_dir,
        PatchCoreConfig(seed=config.seed),
        config.image_size,
        config.fit,
        fraction=config.fraction,
    )
    run = load_anomaly_run(out_dir)
    metrics = evaluate_anomaly_run(
        out_dir,
        policy,
        corruptions=True,
        max_robustness_images=max_robustness_images,
        show_progress=show_progress,
    )
    exported = export_anomaly_run(out_dir, out_dir / "model.onnx")
    onnx_path = Path(exported["path"])
    fit = run.fit
    train = {
        "model": ANOMALY_MODEL,
        "epochs_run": 0,
        "stopped_early": False,
        "train_seconds": fit["fit_seconds"],
        "images_per_second": fit["good_parts"] / max(fit["fit_seconds"], 1e-9),
        **fit,
    }
    parameters = sum(p.numel() for p in run.net.parameters()) + run.net.bank.numel()
    return StageOutcome(
        model=config.model,
        fraction=config.fraction,
        run_dir=out_dir,
        onnx_path=onnx_path,
        parameters=int(parameters),
        train_images=int(fit["good_parts"]),
        train=train,
        metrics=metrics,
        parity=exported["parity"],
        seconds=time.perf_counter() - t0,
        latency_ms_per_image=measure_latency(onnx_path, run.input_size, serving_batch),
        extra={"kind": "anomaly"},
    )
