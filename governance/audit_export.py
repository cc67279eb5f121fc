"""`kensa audit export`: one archive with everything a third party needs to check a model version.

It gathers, for one registered version: the ONNX file and its metadata, the registry record, the
evaluation evidence (metrics with slices, band, parity, plots, the pilot's KPI gate), the dataset
manifest, the configs and code version, and every audit event about the version with the hash
links around them; renders the model card from those files; hashes everything into
``MANIFEST.sha256``. ``governance/verify.py`` re-checks a bundle.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy import select

from kensa import __version__
from kensa.flows.tracking import configure_mlflow
from kensa.governance import bundle as b
from kensa.governance.modelcard import render_html, render_markdown
from kensa.models.data.ingest import DATASET_FILE, compute_version
from kensa.models.onnx.contract import decode_metadata
from kensa.registry import MODEL_ARTIFACT, ONNX_FILE, TAG_CODE_VERSION, TAG_DATASET_VERSION
from kensa.settings import Settings
from kensa.store.audit import GENESIS_HASH, append_event, head_hash
from kensa.store.connect import open_store
from kensa.store.models import AuditEvent

log = logging.getLogger("kensa.audit")

CHOSEN_RUN_TAG = "kensa.sweep.chosen_run"  # set by the sweep on its run: the trial it registered
PARENT_RUN_TAG = "mlflow.parentRunId"


class AuditExportError(ValueError):
    """The version cannot be exported as asked (unknown version, dataset manifest not found)."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    name: str
    version: str
    files: int
    bytes: int
    manifest_sha256: str
    events: int
    decisions: int
    warnings: tuple[str, ...]


def _iso(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _event_json(e: AuditEvent) -> dict[str, Any]:
    # created_at in the exact spelling the hash recipe uses (kensa.store.audit).
    return {
        "id": e.id,
        "created_at": e.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "details": e.details,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    }


def _concerns(e: AuditEvent, name: str, version: str) -> bool:
    if e.subject == f"model:{name}/{version}":
        return True
    # A later approval or a rollback on another version retires this one: part of its history.
    details = e.details if isinstance(e.details, dict) else {}
    return e.subject.startswith(f"model:{name}/") and version in (
        str(details.get("from_version")),
        str(details.get("previous_champion")),
    )


def collect_events(
    settings: Settings, name: str, version: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The version's audit events and the chain around them (every link from the first to the last).

    Links of events about other subjects are given as (id, prev_hash, hash) only: enough to see
    that nothing between the version's events was removed, without disclosing unrelated content.
    """
    factory = open_store(settings)
    with factory() as session:
        candidates = session.scalars(
            select(AuditEvent).where(AuditEvent.subject.like(f"model:{name}/%")).order_by(AuditEvent.id)
        ).all()
        events = [_event_json(e) for e in candidates if _concerns(e, name, version)]
        chain: dict[str, Any] = {"genesis_hash": GENESIS_HASH, "links": [], "included": []}
        if events:
            first, last = events[0]["id"], events[-1]["id"]
            rows = session.execute(
                select(AuditEvent.id, AuditEvent.prev_hash, AuditEvent.hash)
                .where(AuditEvent.id >= first, AuditEvent.id <= last)
                .order_by(AuditEvent.id)
            ).all()
            chain["links"] = [[int(i), p, h] for i, p, h in rows]
            chain["included"] = [e["id"] for e in events]
        head_id = session.scalar(select(AuditEvent.id).order_by(AuditEvent.id.desc()).limit(1))
        chain["head_at_export"] = {"id": head_id, "hash": head_hash(session)}
    return events, chain


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    try:
        return {a.path for a in client.list_artifacts(run_id, path)}
    except (MlflowException, OSError):
        return set()


def _download(client: MlflowClient, run_id: str, artifact: str, target: Path) -> bool:
    """Copy one run artifact to ``target``; False when the run does not have it."""
    parent = artifact.rsplit("/", 1)[0] if "/" in artifact else None
    if artifact not in _artifact_paths(client, run_id, parent):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, artifact, tmp))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
    return True


def _run_record(run: Run, role: str) -> dict[str, Any]:
    inputs = [
        {
            "name": d.dataset.name,
            "digest": d.dataset.digest,
            "source": d.dataset.source,
            "tags": {t.key: t.value for t in d.tags},
        }
        for d in (run.inputs.dataset_inputs if run.inputs else [])
    ]
    return {
        "role": role,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "start_time": _iso(run.info.start_time),
        "end_time": _iso(run.info.end_time),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        # The logged-model history tag is bulky MLflow bookkeeping, not evidence.
        "tags": {k: v for k, v in run.data.tags.items() if k != "mlflow.log-model.history"},
        "dataset_inputs": inputs,
    }


def _dataset_root(runs: list[Run], version: str) -> Path | None:
    """The dataset folder a run recorded as its MLflow dataset input (a local file URI).

    Retraining records two inputs (the new version and its base): the one whose
    ``kensa.dataset_version`` tag is the model's dataset version wins.
    """
    found: list[tuple[bool, Path]] = []
    for run in runs:
        for d in run.inputs.dataset_inputs if run.inputs else []:
            try:
                uri = json.loads(d.dataset.source).get("uri", "")
            except (json.JSONDecodeError, AttributeError):
                continue
            parsed = urlparse(uri)
            if parsed.scheme == "file":
                tags = {t.key: t.value for t in d.tags}
                found.append((tags.get(TAG_DATASET_VERSION) == version, Path(unquote(parsed.path))))
    found.sort(key=lambda f: not f[0])  # stable: matching versions first, then recording order
    return found[0][1] if found else None


def _copy_dataset(root: Path, expected: str, folder: Path | None, runs: list[Run]) -> Path:
    folder = folder or _dataset_root(runs, expected)
    if folder is None:
        raise AuditExportError(
            "the training runs record no local dataset folder; pass --data FOLDER "
            "(the ingested dataset the model was trained on)"
        )
    source = folder / DATASET_FILE
    if not source.is_file():
        raise AuditExportError(
            f"{source} does not exist; pass --data with the ingested dataset folder "
            f"of version {expected[:12]}"
        )
    raw = source.read_bytes()
    try:
        records = json.loads(raw)["records"]
        version = compute_version((r["sha256"], r["label"], r["split"]) for r in records)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AuditExportError(f"{source} cannot be read ({exc!r})") from None
    if expected and version != expected:
        raise AuditExportError(
            f"{folder} holds dataset version {version[:12]}, but the model was trained "
            f"on {expected[:12]}; pass --data with that version's folder"
        )
    target = root / b.DATASET
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw)
    return folder


def _bundle_readme(name: str, version: str) -> str:
    return f"""# Audit bundle: {name} version {version}

Start with `model_card.html` (or `model_card.md`). Every figure on the card comes from a file here.

Check the bundle: `kensa audit verify THIS.tar.gz`, or by hand:

1. Files: `sha256sum -c {b.MANIFEST}` inside this folder.
2. Model file: the SHA-256 of `{b.ONNX}` must equal the tag `kensa.onnx_sha256` in `{b.MODEL_VERSION}`
   and the `sha256` of the `model.register` and `model.approve` events in `{b.EVENTS}`.
3. Audit trail: for each event in `{b.EVENTS}`,
   `hash = sha256(prev_hash + canonical)` where `canonical` is the JSON object
   `{{"action","actor","created_at","details","subject"}}` with sorted keys, separators `,` and `:`,
   non-ASCII kept as UTF-8. In `{b.CHAIN}`, `links` lists `[id, prev_hash, hash]` for every event
   from the first to the last included one (events about other subjects: links only); each link's
   `prev_hash` must equal the previous link's `hash`. `head_at_export` is the trail's newest hash
   when this bundle was made: compare it with the live store (`kensa audit verify --live`).
4. Parity: `{b.PARITY_SAMPLE}` gives a seed; `numpy.random.default_rng(seed).integers(0, 256,
   (n, input_size, input_size, 3), dtype=numpy.uint8)` are the images, `probs` what the model must
   output for them (input `images`, output `probs`, within `atol`).
5. Dataset: the version is `sha256` over the sorted lines `"<image sha256>\\t<label>\\t<split>\\n"` of the
   records in `{b.DATASET}`; it must equal the tag `kensa.dataset_version`.

The event hash of step 3, for each line `e` of `{b.EVENTS}` (must equal `e["hash"]`):

```python
import hashlib, json
def event_hash(e):
    body = {{k: e[k] for k in ("action", "actor", "created_at", "details", "subject")}}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((e["prev_hash"] + canonical).encode("utf-8")).hexdigest()
```
"""


def _write_evidence(
    client: MlflowClient, root: Path, version_run: Run, warnings: list[str]
) -> tuple[Run, Run | None]:
    """Evaluation files, plots and run records; returns (evaluation run, pilot run)."""
    chosen = version_run.data.tags.get(CHOSEN_RUN_TAG)
    eval_run = client.get_run(chosen) if chosen else version_run
    parent = version_run.data.tags.get(PARENT_RUN_TAG)
    pilot = client.get_run(parent) if parent else None
    for artifact, rel in (("metrics.json", b.METRICS), ("band.json", b.BAND), ("parity.json", b.PARITY)):
        if not _download(client, eval_run.info.run_id, artifact, root / rel):
            warnings.append(f"run {eval_run.info.run_id} has no {artifact}")
    _download(client, version_run.info.run_id, "sweep.json", root / b.SWEEP)
    # Experiments and retraining gate the run they register from; the sweep's gate is its pilot's.
    if not _download(client, version_run.info.run_id, "kpi_gate.json", root / b.GATE) and pilot:
        _download(client, pilot.info.run_id, "kpi_gate.json", root / b.GATE)
    for run in {eval_run.info.run_id, version_run.info.run_id}:
        for path in sorted(_artifact_paths(client, run, "plots")):
            if path.endswith(".png"):
                _download(client, run, path, root / b.PLOTS_DIR / path.rsplit("/", 1)[-1])
    records = [_run_record(version_run, "registered from")]
    if eval_run.info.run_id != version_run.info.run_id:
        records.append(_run_record(eval_run, "evaluated in (chosen sweep trial)"))
    if pilot is not None:
        records.append(_run_record(pilot, "pilot"))
    b.write_json(root, b.RUNS, records)
    return eval_run, pilot


def build_bundle(
    settings: Settings,
    name: str,
    version: str,
    root: Path,
    *,
    exported_by: str,
    data: Path | None = None,
    project_config: dict[str, Any] | None = None,
) -> list[str]:
    """Write every bundle file into the folder ``root``; returns warnings (missing optional parts)."""
    client = configure_mlflow(settings)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise AuditExportError(
            f"{name} version {version} is not in the registry ({exc.message.splitlines()[0]})"
        ) from None
    warnings: list[str] = []
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        onnx_file = local / ONNX_FILE if (local / ONNX_FILE).is_file() else local / MODEL_ARTIFACT / ONNX_FILE
        (root / b.ONNX).parent.mkdir(parents=True)
        shutil.copyfile(onnx_file, root / b.ONNX)
    import onnx

    proto = onnx.load(str(root / b.ONNX), load_external_data=False)
    meta = decode_metadata(proto)
    b.write_json(root, b.ONNX_METADATA, meta)
    sample = meta.get("parity_sample") or {}
    thresholds = meta.get("thresholds") or {}
    # Copied out of the file at export: verify compares the file against this, not against itself.
    b.write_json(
        root,
        b.PARITY_SAMPLE,
        {
            **sample,
            "input_size": meta.get("input_size"),
            "classes": meta.get("classes"),
            "t_ok": thresholds.get("t_ok"),
            "t_defect": thresholds.get("t_defect"),
        },
    )
    b.write_json(
        root,
        b.MODEL_VERSION,
        {
            "name": name,
            "version": str(mv.version),
            "run_id": mv.run_id,
            "source": mv.source,
            "registered_at": _iso(mv.creation_timestamp),
            "status": mv.status,
            "description": mv.description or "",
            "tags": dict(mv.tags),
            "aliases": sorted(mv.aliases or []),
        },
    )
    if not mv.run_id:
        raise AuditExportError(f"{name} version {version} records no MLflow run (not registered by kensa)")
    version_run = client.get_run(mv.run_id)
    eval_run, pilot = _write_evidence(client, root, version_run, warnings)
    b.write_json(root, b.TRAINING_CONFIG, meta.get("training_config") or {})
    if project_config is not None:
        b.write_json(
            root,
            b.PROJECT_CONFIG,
            {"note": "the project config given at export time", "config": project_config},
        )
    runs = [version_run, *([pilot] if pilot else [])]
    dataset_folder = _copy_dataset(root, mv.tags.get(TAG_DATASET_VERSION, ""), data, runs)
    b.write_json(
        root,
        b.CODE,
        {
            "kensa.code_version": mv.tags.get(TAG_CODE_VERSION, ""),
            "onnx_producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "metadata_code_version": meta.get("code_version"),
            "exported_with_kensa": __version__,
        },
    )
    events, chain = collect_events(settings, name, str(mv.version))
    (root / b.EVENTS).parent.mkdir(parents=True, exist_ok=True)
    with (root / b.EVENTS).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in events)
    b.write_json(root, b.CHAIN, chain)
    b.write_json(root, b.APPROVALS, b.decisions(events, str(mv.version)))
    b.write_json(
        root,
        b.BUNDLE_JSON,
        {
            "format": b.FORMAT,
            "model": {"name": name, "version": str(mv.version)},
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "exported_by": exported_by,
            "kensa_version": __version__,
            "dataset_folder": str(dataset_folder),
            "runs": {
                "registered_from": version_run.info.run_id,
                "evaluated_in": eval_run.info.run_id,
                "pilot": pilot.info.run_id if pilot else None,
            },
            "warnings": warnings,
        },
    )
    (root / b.README).write_text(_bundle_readme(name, str(mv.version)), encoding="utf-8")
    evidence = b.card_evidence(b.read_view(root))
    (root / b.CARD_MD).write_text(render_markdown(evidence), encoding="utf-8")
    (root / b.CARD_HTML).write_text(render_html(evidence), encoding="utf-8")
    return warnings


def export_bundle(
    settings: Settings,
    name: str,
    version: str,
    out: Path,
    *,
    exported_by: str,
    data: Path | None = None,
    project_config: dict[str, Any] | None = None,
) -> ExportReport:
    """Build the bundle of ``name``/``version`` and write it to ``out`` (a .tar.gz).

    The export itself is recorded in the audit trail (``audit.export``, with the manifest's hash),
    so the trail remembers which bundles exist.
    """
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise AuditExportError(f"--out must name a .tar.gz (or .tgz) file; got {out.name!r}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / f"kensa-audit-{name}-v{version}"
        warnings = build_bundle(
            settings, name, version, root, exported_by=exported_by, data=data, project_config=project_config
        )
        manifest = b.write_manifest(root)
        files = len(b.bundle_files(root)) + 1
        events = b.read_events(root)
        n_decisions = sum(1 for d in b.decisions(events, version) if d["applies_to_version"])
        b.pack(root, out, datetime.now(UTC).timestamp())
    factory = open_store(settings)
    with factory() as session:
        append_event(
            session,
            actor=exported_by,
            action="audit.export",
            subject=f"model:{name}/{version}",
            details={"manifest_sha256": manifest, "file": out.name},
        )
        session.commit()
    log.info(
        "audit_export",
        extra={"model_name": name, "model_version": version, "file": str(out), "manifest": manifest},
    )
    return ExportReport(
        out, name, version, files, out.stat().st_size, manifest, len(events), n_decisions, tuple(warnings)
    )
