"""onnxruntime sessions for verified kensa models: provider choice, FP16 on GPU, parity, warm-up.

Providers are chosen from what actually initialises on this machine (TensorRT, then CUDA, then
CPU), not from what the wheel lists: onnxruntime-gpu lists the GPU providers even where no GPU
or driver exists, and asking for them there prints errors and falls back silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kensa.models.onnx.contract import parity_images
from kensa.serving.inference.artifact import (
    ANOMALY_OUTPUTS,
    ModelRefused,
    ModelSpec,
    check_anomaly_outputs,
    check_parity,
    load_and_check,
)
from kensa.store.models import utcnow

log = logging.getLogger("kensa.serving.engine")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# Shared libraries a GPU provider needs at run time; without them it cannot initialise.
_GPU_LIBRARIES: dict[str, tuple[str, ...]] = {
    CUDA: ("libcuda.so.1",),
    TENSORRT: ("libcuda.so.1", "libnvinfer.so.10"),
}
# FP16 graphs differ from FP32 by rounding; this bounds |Δp| on the parity sample.
FP16_PARITY_ATOL = 2e-2

_probe_lock = threading.Lock()
_library_cache: dict[str, bool] = {}


def _library_loads(name: str) -> bool:
    with _probe_lock:
        if name not in _library_cache:
            try:
                ctypes.CDLL(name)
                _library_cache[name] = True
            except OSError:
                _library_cache[name] = False
        return _library_cache[name]


def candidate_providers() -> list[str]:
    """Providers worth trying here, best first: GPU ones only where their libraries load."""
    available = set(ort.get_available_providers())
    out = [
        p
        for p in (TENSORRT, CUDA)
        if p in available and all(_library_loads(lib) for lib in _GPU_LIBRARIES[p])
    ]
    return [*out, CPU]


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    # While probing, a provider that fails may log errors and print an "EP Error" banner even
    # though falling back is the expected outcome; keep both out of the service's logs.
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield None
    finally:
        ort.set_default_logger_severity(3)


def cpu_threads() -> int:
    """onnxruntime's intra-op threads per batch: half the cores (the rest decode and serve HTTP)."""
    return max(1, (os.cpu_count() or 2) // 2)


# A model whose warm-up inference costs at least this much per image (on one batch's threads) is
# "heavy": it, not decoding and HTTP (about 1-5 ms per part on a small CPU), bounds throughput, so
# serving runs two batches at once and inference gets every core. A light model keeps one batch in
# flight: a second one would take the cores that decode and answer (measured in bench/serving).
HEAVY_MODEL_MS_PER_IMAGE = 6.0


def choose_runners(ms_per_image: float, configured: int = 0) -> int:
    """Batches in inference at once: ``configured`` when set (> 0), else from the warm-up timing."""
    if configured > 0:
        return configured
    return 2 if ms_per_image >= HEAVY_MODEL_MS_PER_IMAGE else 1


def _provider_options(provider: str, cache_dir: Path | None) -> dict[str, str]:
    if provider == TENSORRT and cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        return {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache_dir),
            "trt_fp16_enable": "True",
        }
    return {}


def open_session(
    path: Path, providers: list[str], cache_dir: Path | None = None
) -> tuple[ort.InferenceSession, str]:
    """The first provider in ``providers`` that initialises for this model, and its session."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Leave cores to the decode threads and the event loop, and do not let idle onnxruntime
    # threads spin: on a small CPU, spinning workers starve decoding and halve throughput.
    opts.intra_op_num_threads = cpu_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for provider in providers:
        if provider == CPU:
            return ort.InferenceSession(str(path), opts, providers=[CPU]), CPU
        try:
            with _quiet_ort():
                session = ort.InferenceSession(
                    str(path),
                    opts,
                    providers=[(provider, _provider_options(provider, cache_dir)), CPU],
                )
        except Exception as exc:  # a provider that cannot start is expected; try the next one
            log.info("provider_unavailable", extra={"provider": provider, "reason": type(exc).__name__})
            continue
        if session.get_providers()[0] == provider:
            return session, provider
        log.info("provider_unavailable", extra={"provider": provider, "reason": "fell_back_to_cpu"})
    raise RuntimeError("no onnxruntime provider initialised (CPU is always tried last)")


CLASSIFIER_OUTPUTS = ("probs", "features")


def fetched_outputs(spec: ModelSpec) -> list[str]:
    """The outputs one inference fetches: an anomaly model's score and map only where it has them.

    A map is S × S floats per image (256 KiB at 256 px); a classifier never pays for one.
    """
    return [*CLASSIFIER_OUTPUTS, *(ANOMALY_OUTPUTS if spec.is_anomaly else ())]


@dataclass(frozen=True)
class Inference:
    """What one batch's inference gave: the classifier's outputs, and an anomaly model's extras."""

    probs: np.ndarray  # (B, C) float64
    features: np.ndarray  # (B, K) float32
    scores: np.ndarray | None = None  # (B,) float64, anomaly models only
    maps: np.ndarray | None = None  # (B, S, S) float32 in [0, 1), anomaly models only


@dataclass
class ServedModel:
    """A verified, warmed-up model that may judge parts. Immutable once published."""

    name: str
    version: str
    sha256: str
    path: Path
    spec: ModelSpec
    session: ort.InferenceSession
    provider: str
    precision: str  # fp32 | fp16
    # Batches the batcher may run at once on this model, and the warm-up timing it came from.
    runners: int = 1
    warmup_ms_per_image: float = 0.0
    loaded_at: datetime = field(default_factory=utcnow)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, S, S, 3) → probs (B, C) float64 and features (B, K) float32."""
        probs, features = self.session.run(list(CLASSIFIER_OUTPUTS), {"images": images})
        return np.asarray(probs, dtype=np.float64), np.asarray(features, dtype=np.float32)

    def infer(self, images: np.ndarray) -> Inference:
        """uint8 (B, S, S, 3) → everything serving reads: ``run``'s outputs, plus score and
        anomaly map (one session run) for an anomaly model."""
        if not self.spec.is_anomaly:
            return Inference(*self.run(images))
        probs, features, scores, maps = self.session.run(fetched_outputs(self.spec), {"images": images})
        return Inference(
            np.asarray(probs, dtype=np.float64),
            np.asarray(features, dtype=np.float32),
            np.asarray(scores, dtype=np.float64),
            np.asarray(maps, dtype=np.float32),
        )

    def describe(self) -> dict[str, object]:
        return {
            "model_name": self.name,
            "model_version": self.version,
            "sha256": self.sha256,
            "architecture": self.spec.architecture,
            "kind": self.spec.kind,
            "classes": list(self.spec.classes),
            "input_size": self.spec.input_size,
            "thresholds": {"t_ok": self.spec.t_ok, "t_defect": self.spec.t_defect},
            "provider": self.provider,
            "precision": self.precision,
            "runners": self.runners,
            "warmup_ms_per_image": round(self.warmup_ms_per_image, 3),
            "loaded_at": self.loaded_at.isoformat(),
        }


def _warm_up(session: ort.InferenceSession, spec: ModelSpec, max_batch: int) -> float:
    """Run each batch size once, then time a full batch: milliseconds per image.

    The first runs at a new batch size allocate memory and (on GPU) pick kernels; pay that here,
    before the model is published, not on the first parts of the line. The outputs fetched are
    the ones serving fetches, so the timing (and the runners chosen from it) includes the map.
    """
    size, outputs = spec.input_size, fetched_outputs(spec)
    for batch in sorted({1, max_batch}):
        session.run(outputs, {"images": np.zeros((batch, size, size, 3), np.uint8)})
    images = np.zeros((max_batch, size, size, 3), np.uint8)
    best = float("inf")
    for _ in range(2):  # the faster of two runs: a timing less disturbed by whatever else runs
        started = time.perf_counter()
        session.run(outputs, {"images": images})
        best = min(best, time.perf_counter() - started)
    return best * 1000.0 / max_batch


def _check_maps(spec: ModelSpec, session: ort.InferenceSession) -> None:
    """The parity sample through the outputs an anomaly model promises: a map the size of the
    input for each image, so a region is never cut from a map of the wrong shape."""
    images = parity_images(spec.parity.seed, spec.parity.n, spec.input_size)
    probs, _, scores, maps = session.run(fetched_outputs(spec), {"images": images})
    check_anomaly_outputs(
        spec,
        np.asarray(scores, dtype=np.float64),
        np.asarray(maps, dtype=np.float32),
        np.asarray(probs, dtype=np.float64),
    )


def load_model(
    path: Path,
    *,
    name: str,
    version: str,
    expected_sha256: str | None,
    max_batch: int,
    cache_dir: Path | None = None,
    runners: int = 0,
) -> ServedModel:
    """Verify ``path`` (hash, checker, signature, parity), open it on the best provider, warm up.

    Raises ModelRefused naming the failed step. On a GPU provider, a ``model.fp16.onnx`` beside
    the file is used instead when its own parity check passes (it is optional, never required).
    ``runners`` is how many batches may run at once; 0 chooses it from the warm-up timing.
    """
    started = time.perf_counter()
    sha, spec = load_and_check(path, expected_sha256)
    providers = candidate_providers()
    try:
        session, provider = open_session(path, providers, cache_dir)
    except Exception as exc:
        raise ModelRefused("session", f"onnxruntime cannot load the model: {type(exc).__name__}") from exc

    def run_probs(s: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
        return lambda images: np.asarray(s.run(["probs"], {"images": images})[0])

    try:
        check_parity(spec, run_probs(session))
        if spec.is_anomaly:
            _check_maps(spec, session)
    except ModelRefused:
        raise
    except Exception as exc:  # the graph fails at run time (wrong ops, shapes)
        raise ModelRefused("parity", f"the model fails to run: {type(exc).__name__}") from exc
    precision = "fp32"
    fp16_path = path.with_name(path.stem + ".fp16.onnx")
    if provider != CPU and fp16_path.is_file():
        try:
            fp16_session, fp16_provider = open_session(fp16_path, [provider], cache_dir)
            check_parity(spec, run_probs(fp16_session), atol=FP16_PARITY_ATOL)
            if spec.is_anomaly:
                _check_maps(spec, fp16_session)
            session, provider, precision = fp16_session, fp16_provider, "fp16"
        except Exception as exc:  # the FP32 graph is verified; FP16 is only an optimisation
            log.warning(
                "fp16_skipped", extra={"model_name": name, "model_version": version, "reason": str(exc)}
            )
    ms_per_image = _warm_up(session, spec, max_batch)
    chosen = choose_runners(ms_per_image, runners)
    log.info(
        "model_verified",
        extra={
            "model_name": name,
            "model_version": version,
            "sha256": sha,
            "provider": provider,
            "precision": precision,
            "warmup_ms_per_image": round(ms_per_image, 3),
            "runners": chosen,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return ServedModel(name, version, sha, path, spec, session, provider, precision, chosen, ms_per_image)
