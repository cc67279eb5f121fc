"""The MLflow registry side of kensa: register candidates, approve, reject, roll back — audited."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec

from kensa import __version__
from kensa.governance.approvals import (  # re-exported: flows call them from here
    TAG_PREVIOUS_CHAMPION,
    Approval,
    ApprovalError,
    approve,
    audit_model_event,
    reject,
    rollback,
)
from kensa.models.onnx.export import read_metadata, sha256_file, working_providers
from kensa.monitoring.reference import REFERENCE_ARTIFACT_DIR, REFERENCE_FILE, TAG_REFERENCE
from kensa.registry import (
    ALIAS_CANDIDATE,
    MODEL_ARTIFACT,
    ONNX_FILE,
    TAG_CODE_VERSION,
    TAG_COST,
    TAG_DATASET_VERSION,
    TAG_KPI,
    TAG_PARITY,
    TAG_REGISTERED_BY,
    TAG_SHA256,
    TAG_SOURCE,
    TAG_STATUS,
    TAG_THRESHOLDS,
)
from kensa.settings import Settings

log = logging.getLogger("kensa.flows.registry")


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    sha256: str


def register_candidate(
    onnx_path: Path,
    name: str,
    *,
    registered_by: str,
    source: str,
    kpi: dict[str, Any],
    cost: dict[str, Any],
    parity: dict[str, Any],
    settings: Settings,
    reference: Path | None = None,
) -> Registered:
    """Log the ONNX file to the active run, register it and point ``candidate`` at it.

    The SHA-256 recorded is that of the file as stored in the registry, which is what serving
    verifies after download. ``reference`` is the drift monitor's reference profile
    (``monitoring.reference``); when None and the ONNX file sits in a training run directory, the
    profile is built from that run's calibration split. It is logged to the run and named in the
    version's ``kensa.reference`` tag; a model registered without one is registered unmonitored.
    """
    meta = read_metadata(onnx_path)
    proto = onnx.load(str(onnx_path))
    info = mlflow.onnx.log_model(
        proto,
        name=MODEL_ARTIFACT,
        signature=onnx_signature(proto),
        registered_model_name=name,
        save_as_external_data=False,
        onnx_execution_providers=working_providers(),
        # Stated, not inferred: inference costs MLflow a subprocess and 5–10 s per registration.
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={_ort_version()}"],
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp)
        digest = sha256_file(Path(local) / ONNX_FILE)
    tags = {
        TAG_SHA256: digest,
        TAG_DATASET_VERSION: str(meta.get("dataset_version", "")),
        TAG_THRESHOLDS: json.dumps(meta.get("thresholds", {}), sort_keys=True),
        TAG_KPI: json.dumps(kpi, sort_keys=True, default=str),
        TAG_COST: json.dumps(cost, sort_keys=True, default=str),
        TAG_PARITY: json.dumps(parity, sort_keys=True, default=str),
        TAG_CODE_VERSION: __version__,
        TAG_REGISTERED_BY: registered_by,
        TAG_SOURCE: source,
        TAG_STATUS: "candidate",
    }
    reference_uri = _log_reference(reference or _build_reference(onnx_path))
    if reference_uri:
        tags[TAG_REFERENCE] = reference_uri
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, ALIAS_CANDIDATE, version)
    audit_model_event(
        settings,
        registered_by,
        "model.register",
        name,
        version,
        {"sha256": digest, "source": source, "kpi": kpi},
    )
    return Registered(name, version, digest)


def onnx_signature(proto: onnx.ModelProto) -> ModelSignature:
    """The MLflow signature of a kensa ONNX model, read from its graph (the artifact contract):
    ``images`` uint8 (-1, H, W, 3) in; ``probs`` float32 (-1, C), ``features`` float32 (-1, K) and
    any other output the graph declares out. A symbolic or unknown dimension (the batch) is -1.
    """
    weights = {t.name for t in proto.graph.initializer}  # old exporters list weights as inputs

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        return TensorSpec(dtype, shape, value.name)

    return ModelSignature(
        inputs=Schema([spec(v) for v in proto.graph.input if v.name not in weights]),
        outputs=Schema([spec(v) for v in proto.graph.output]),
    )


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _build_reference(onnx_path: Path) -> Path | None:
    """The calibration-split reference profile of the run that produced ``onnx_path``, if any."""
    from kensa.models.train.trainer import CHECKPOINT_NAME, load_checkpoint
    from kensa.monitoring.reference import build_reference

    run_dir = onnx_path.parent
    if not (run_dir / CHECKPOINT_NAME).is_file():
        return None
    try:
        from kensa.models.train.anomaly import is_anomaly_run, load_anomaly_run

        # Either kind of run: the reference is built from the ONNX file's own outputs.
        loaded = load_anomaly_run(run_dir) if is_anomaly_run(run_dir) else load_checkpoint(run_dir)
        return build_reference(onnx_path, loaded.dataset_root).save(run_dir / REFERENCE_FILE)
    except (OSError, ValueError, KeyError) as exc:
        # Registration must not fail for want of a drift reference; the monitor says it is missing.
        log.warning("reference_not_built", extra={"onnx": str(onnx_path), "error": str(exc)})
        return None


def _log_reference(path: Path | None) -> str | None:
    """Log a reference profile to the active run as ``monitoring/reference.npz``; its URI."""
    if path is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / REFERENCE_FILE
        shutil.copyfile(path, named)
        mlflow.log_artifact(str(named), REFERENCE_ARTIFACT_DIR)
    run = mlflow.active_run()  # log_artifact starts one if the caller had none
    if run is None:
        return None
    return f"runs:/{run.info.run_id}/{REFERENCE_ARTIFACT_DIR}/{REFERENCE_FILE}"


__all__ = [
    "TAG_PREVIOUS_CHAMPION",
    "Approval",
    "ApprovalError",
    "Registered",
    "approve",
    "onnx_signature",
    "register_candidate",
    "reject",
    "rollback",
]
