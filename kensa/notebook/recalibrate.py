"""A registered model's review band recalibrated on new parts: a new governed version, no refit.

The thresholds live in the ONNX file's metadata (serving reads them from there) and in the
registry's tags. Recalibrating keeps the graph (weights, memory bank, normalisation) exactly as the
registered version has it and changes only those thresholds:

1. the version's ONNX file comes from the registry, its SHA-256 checked against registration;
2. the calibration split of a dataset version (by default the one the version was judged on;
   usually a newer one from the line) is scored by that file under ONNX Runtime, as serving
   scores it;
3. the band is calibrated as at evaluation: a classifier's certifies escapes and false rejects;
   an anomaly model's certifies false rejects from good parts alone and escapes only when enough
   defective parts are there (:mod:`kensa.models.evaluation.anomaly_band`);
4. the test split is judged with the new band by the project's KPI gate; a band that fails it is
   not registered;
5. the file with the new metadata is registered as a new ``candidate`` naming the version it came
   from (``kensa.recalibrated_from``), with the audit event ``model.recalibrate``. Like every
   candidate it serves only after a person approves it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import onnx

from kensa.flows.common import FlowContext
from kensa.flows.config import ProjectConfig
from kensa.flows.gate import GateFailedError, GateResult, evaluate_gate
from kensa.flows.register import register_candidate
from kensa.flows.tracking import log_dataset_input
from kensa.governance.approvals import audit_model_event
from kensa.models.data.ingest import DatasetVersion, load_dataset
from kensa.models.evaluation.anomaly_band import calibrate_anomaly_band
from kensa.models.evaluation.assess_model import save_onnx
from kensa.models.evaluation.qc import OK, defect_scores, model_labels, qc_metrics
from kensa.models.evaluation.thresholds import BandResult, calibrate_band
from kensa.models.onnx.contract import read_metadata, read_preprocess
from kensa.models.onnx.export import cpu_session, run_onnx
from kensa.models.train.trainer import split_tensors
from kensa.monitoring.reference import REFERENCE_FILE, build_reference
from kensa.notebook.compare import CompareError, dataset_of, download_version, get_version, registry_context
from kensa.registry import TAG_COST, TAG_PARITY
from kensa.settings import Settings

TAG_RECALIBRATED_FROM = "kensa.recalibrated_from"


@dataclass(frozen=True)
class Recalibrated:
    """What recalibration registered, and the evidence it was judged on."""

    name: str
    version: str
    from_version: str
    dataset_version: str
    band: dict[str, Any]
    previous_band: dict[str, Any]
    test: dict[str, Any]  # QC on the test split with the new band
    gate: GateResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "from_version": self.from_version,
            "dataset_version": self.dataset_version,
            "band": self.band,
            "previous_band": self.previous_band,
            "test": self.test,
            "gate": self.gate.to_dict(),
        }


def _judge(path: Path, meta: dict[str, Any], ds: DatasetVersion, split: str) -> tuple[Any, Any]:
    """Probabilities of ``split`` under the ONNX file, and labels as the model's class indices."""
    parts = split_tensors(ds, split, read_preprocess(meta))  # decoded as serving decodes
    probs = run_onnx(cpu_session(path), parts.images.permute(0, 2, 3, 1).contiguous().numpy())
    return probs, model_labels(meta["classes"], ds.classes, parts.labels.numpy())


def _band(meta: dict[str, Any], scores: Any, defective: Any, ctx: FlowContext) -> BandResult:
    p = ctx.policy
    calibrate = calibrate_anomaly_band if meta.get("kind") == "anomaly" else calibrate_band
    return calibrate(scores, defective, alpha=p.alpha, delta=p.delta, max_false_reject=p.max_false_reject)


def recalibrate_version(
    version: str,
    *,
    registered_by: str,
    reason: str,
    name: str | None = None,
    data: str | Path | None = None,
    config: ProjectConfig | str | Path | None = None,
    settings: Settings | None = None,
) -> Recalibrated:
    """Calibrate ``version``'s band on ``data`` and register the result as a new candidate.

    Raises :class:`~kensa.notebook.compare.CompareError` for an unknown version or a missing
    dataset, :class:`~kensa.models.evaluation.anomaly_band.NotEnoughCalibrationError` when the
    calibration split cannot carry the guarantee, and :class:`~kensa.flows.gate.GateFailedError`
    when the recalibrated band misses the KPI on the test split (nothing is registered then).
    """
    if not reason.strip():
        raise ValueError("a recalibration needs a reason (it is a governed change to what the line runs)")
    ctx = registry_context(config, settings)
    settings, project, client = ctx.settings, ctx.config, ctx.client
    model = name or project.name
    source_version = get_version(client, model, version)
    root = Path(data) if data else dataset_of(client, model, version)
    if root is None:
        msg = f"cannot find the dataset {model}/{version} was judged on; pass --data DIR"
        raise CompareError(msg)
    ds = load_dataset(root)
    with tempfile.TemporaryDirectory() as tmp:
        src = download_version(client, model, version, Path(tmp) / "source")
        meta = read_metadata(src)
        classes = list(meta["classes"])
        probs, labels = _judge(src, meta, ds, "calibration")
        band = _band(meta, defect_scores(probs, classes), labels != classes.index(OK), ctx)
        test_probs, test_labels = _judge(src, meta, ds, "test")
        test = qc_metrics(test_probs, test_labels, classes, band.t_ok, band.t_defect)
        gate = evaluate_gate({**test, "band": band.to_dict()}, project.kpi)
        if not gate.passed:
            msg = f"{model}/{version} recalibrated on {ds.short_version}: {gate.message()} — not registered"
            raise GateFailedError(msg)
        lineage = {
            "version": version,
            "sha256": source_version.tags.get("kensa.onnx_sha256", ""),
            "dataset_version": ds.version,
            "by": registered_by,
            "reason": reason,
        }
        new_meta = {
            **meta,
            "thresholds": {k: getattr(band, k) for k in ("t_ok", "t_defect", "alpha", "delta", "guaranteed")},
            "band": band.to_dict(),
            "calibrated_on_dataset_version": ds.version,
            "recalibrated_from": lineage,
        }
        proto = onnx.load(str(src))
        del proto.metadata_props[:]
        out = Path(tmp) / "recalibrated" / "model.onnx"
        save_onnx(proto, new_meta, out)  # the same graph; only the metadata is new
        reference = build_reference(out, ds.root).save(Path(tmp) / REFERENCE_FILE)
        tags = {"kensa.stage": "recalibrate", "kensa.dataset_version": ds.version}
        with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=f"recalibrate-v{version}", tags=tags):
            log_dataset_input(ds.root, ds.version, name=f"line-{ds.short_version}")
            mlflow.log_dict({**test, "band": band.to_dict()}, "metrics.json")
            mlflow.log_dict(band.to_dict(), "band.json")
            mlflow.log_dict(gate.to_dict(), "kpi_gate.json")
            registered = register_candidate(
                out,
                model,
                registered_by=registered_by,
                source=f"recalibrate:v{version}",
                kpi={
                    "passed": True,
                    "recalibrated_from": version,
                    "escape_rate": test["escape_rate"],
                    "false_reject_rate": test["false_reject_rate"],
                    "automation_rate": test["automation_rate"],
                },
                cost=json.loads(source_version.tags.get(TAG_COST) or "{}"),
                parity=json.loads(source_version.tags.get(TAG_PARITY) or "{}"),
                settings=settings,
                reference=reference,
            )
    client.set_model_version_tag(model, registered.version, TAG_RECALIBRATED_FROM, version)
    audit_model_event(
        settings,
        registered_by,
        "model.recalibrate",
        model,
        registered.version,
        {
            "from_version": version,
            "dataset_version": ds.version,
            "reason": reason,
            "t_ok": band.t_ok,
            "t_defect": band.t_defect,
            "previous": meta.get("thresholds", {}),
        },
    )
    return Recalibrated(
        model,
        registered.version,
        version,
        ds.version,
        band.to_dict(),
        dict(meta.get("band") or meta.get("thresholds") or {}),
        test,
        gate,
    )
