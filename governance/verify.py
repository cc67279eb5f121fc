"""`kensa audit verify`: re-check an audit bundle from its own files, and optionally against the live store.

Offline it recomputes every file hash, every audit-event hash and chain link, the ONNX file's hash
against the registration record, the dataset version from its manifest, and re-runs the parity
sample through the ONNX file with ONNX Runtime. With ``live`` it also compares the bundle with the
store's audit trail and the registry: a bundle rebuilt consistently by a forger passes the offline
checks, but not those.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from kensa import __version__
from kensa.governance import bundle as b
from kensa.governance.modelcard import render_html, render_markdown
from kensa.models.data.ingest import compute_version
from kensa.models.evaluation.qc import verdicts
from kensa.models.onnx.contract import decode_metadata, parity_images
from kensa.registry import (
    ALIAS_CHAMPION,
    TAG_DATASET_VERSION,
    TAG_KPI,
    TAG_SHA256,
    TAG_STATUS,
    TAG_THRESHOLDS,
)
from kensa.settings import Settings
from kensa.store.audit import event_hash

# Figures the registration record audits (kensa.kpi) that metrics.json must still show.
AUDITED_FIGURES = ("escape_rate", "false_reject_rate", "automation_rate")
_EVENT_FIELDS = ("id", "created_at", "actor", "action", "subject", "details", "prev_hash", "hash")


@dataclass(frozen=True)
class Check:
    """One line of the verify table; ``passed`` None means skipped (nothing to check)."""

    name: str
    passed: bool | None
    detail: str


class CheckFailed(Exception):
    """Raised inside a check: the check failed with this message (shown in the table)."""


def _short(h: object) -> str:
    return f"{str(h)[:12]}…"


def check_manifest(root: Path) -> str:
    listed = b.parse_manifest((root / b.MANIFEST).read_text(encoding="utf-8"))
    present = set(b.bundle_files(root))
    missing = sorted(set(listed) - present)
    extra = sorted(present - set(listed))
    changed = sorted(r for r in listed if r in present and b.sha256_path(root / r) != listed[r])
    problems = [
        f"{label}: {', '.join(paths)}"
        for label, paths in (("changed", changed), ("missing", missing), ("not in the manifest", extra))
        if paths
    ]
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{len(listed)} files match their SHA-256"


def _recompute(e: dict[str, Any]) -> str:
    missing = [f for f in _EVENT_FIELDS if f not in e]
    if missing:
        raise CheckFailed(f"event {e.get('id')} lacks {', '.join(missing)}")
    try:
        created = datetime.fromisoformat(str(e["created_at"]))
        return event_hash(
            str(e["prev_hash"]),
            created_at=created,
            actor=e["actor"],
            action=e["action"],
            subject=e["subject"],
            details=e["details"],
        )
    except (ValueError, TypeError) as exc:
        raise CheckFailed(f"event {e.get('id')} cannot be hashed ({exc})") from None


def check_chain(view: b.BundleView) -> str:
    if view.unreadable:
        raise CheckFailed("; ".join(view.unreadable))
    chain = b.read_optional(view.root, b.CHAIN)
    if not isinstance(chain, dict):
        raise CheckFailed(f"{b.CHAIN} is missing or not a JSON object")
    links = chain.get("links")
    if not view.events:
        raise CheckFailed(f"{b.EVENTS} holds no events; every registered version has a model.register event")
    if not isinstance(links, list) or not all(isinstance(x, list) and len(x) == 3 for x in links):
        raise CheckFailed(f"{b.CHAIN} has no list of [id, prev_hash, hash] links")
    problems: list[str] = []
    for prev, cur in zip(links, links[1:], strict=False):
        if cur[0] != prev[0] + 1:
            problems.append(f"links jump from event {prev[0]} to {cur[0]} (events left out)")
        elif cur[1] != prev[2]:
            problems.append(f"event {cur[0]}'s prev_hash is not event {prev[0]}'s hash")
    by_id = {x[0]: x for x in links}
    seen = set()
    for e in view.events:
        recomputed = _recompute(e)
        seen.add(e["id"])
        if recomputed != e["hash"]:
            problems.append(f"event {e['id']} ({e['action']}): content does not match its hash")
        link = by_id.get(e["id"])
        if link is None or link[1:] != [e["prev_hash"], e["hash"]]:
            problems.append(f"event {e['id']} ({e['action']}) is not linked in {b.CHAIN}")
    removed = sorted(set(chain.get("included") or []) - seen)
    if removed:
        problems.append(
            f"event(s) {', '.join(map(str, removed))} are in the chain but missing from {b.EVENTS} (removed)"
        )
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{len(view.events)} events recompute; {len(links)} links unbroken"


def check_approvals(view: b.BundleView) -> str:
    derived = b.decisions(view.events, view.version)
    listed = b.read_optional(view.root, b.APPROVALS)
    problems = []
    if listed != derived:
        problems.append(f"{b.APPROVALS} does not match the decisions in {b.EVENTS}")
    mine = [d for d in derived if d["applies_to_version"]]
    status = view.tags.get(TAG_STATUS, "")
    aliases = view.model_version.get("aliases") or []
    approvals = [d for d in mine if d["action"] == "model.approve"]
    if (status in ("approved", "retired") or ALIAS_CHAMPION in aliases) and not approvals:
        problems.append(
            f"the registry records status {status!r}"
            f"{' and alias champion' if ALIAS_CHAMPION in aliases else ''} "
            f"but no model.approve event for version {view.version}"
        )
    if status == "rejected" and not any(d["action"] == "model.reject" for d in mine):
        problems.append(f"status 'rejected' but no model.reject event for version {view.version}")
    tag_sha = view.tags.get(TAG_SHA256)
    for d in approvals:
        if d["sha256"] and d["sha256"] != tag_sha:
            problems.append(
                f"approval event {d['event_id']} approved file {_short(d['sha256'])}, "
                f"not the registered {_short(tag_sha)}"
            )
    if problems:
        raise CheckFailed("; ".join(problems))
    who = ", ".join(f"{d['action'].split('.')[-1]} by {d['actor']} ({d['role']})" for d in mine)
    return who or f"no decisions yet (status {status or 'unknown'})"


def check_onnx_sha(view: b.BundleView) -> str:
    actual = b.sha256_path(view.root / b.ONNX)
    tag = view.tags.get(TAG_SHA256)
    problems = []
    if actual != tag:
        problems.append(
            f"{b.ONNX} has SHA-256 {_short(actual)}, the registry tag {TAG_SHA256} says {_short(tag)}"
        )
    for e in view.events:
        if e.get("action") == "model.register" and e.get("subject") == f"model:{view.name}/{view.version}":
            recorded = (e.get("details") or {}).get("sha256")
            if recorded != actual:
                problems.append(f"the model.register event (id {e.get('id')}) recorded {_short(recorded)}")
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{_short(actual)} = registered tag = model.register event"


def check_parity(root: Path) -> str:
    import onnxruntime as ort  # imported here: the other checks need no runtime

    sample = b.read_json(root, b.PARITY_SAMPLE)
    try:
        seed, n, size = int(sample["seed"]), int(sample["n"]), int(sample["input_size"])
        want = np.asarray(sample["probs"], dtype=np.float64)
        atol, classes = float(sample["atol"]), list(sample["classes"])
        t_ok, t_defect = float(sample["t_ok"]), float(sample["t_defect"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckFailed(f"{b.PARITY_SAMPLE} is incomplete ({exc!r})") from None
    images = parity_images(seed, n, size)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        session = ort.InferenceSession(str(root / b.ONNX), opts, providers=["CPUExecutionProvider"])
        got = np.asarray(session.run(["probs"], {"images": images})[0], dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - any runtime failure means "this file does not reproduce"
        raise CheckFailed(
            f"{b.ONNX} does not run on the parity sample ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from None
    if got.shape != want.shape:
        raise CheckFailed(f"the model outputs probs of shape {got.shape}, the recorded sample {want.shape}")
    diff = float(np.abs(got - want).max())
    v_got, v_want = verdicts(got, classes, t_ok, t_defect)[0], verdicts(want, classes, t_ok, t_defect)[0]
    changed = int((v_got != v_want).sum())
    if diff > atol or changed:
        raise CheckFailed(f"max |Δp| = {diff:.2e} (limit {atol:.0e}), {changed} of {n} verdicts changed")
    return f"{n} images re-run with ONNX Runtime: max |Δp| = {diff:.1e} ≤ {atol:.0e}, verdicts identical"


def _file_metadata(root: Path) -> dict[str, Any]:
    import onnx

    try:
        return decode_metadata(onnx.load(str(root / b.ONNX), load_external_data=False))
    except Exception as exc:  # noqa: BLE001 - a swapped or truncated file fails protobuf parsing
        raise CheckFailed(f"{b.ONNX} is not a readable ONNX file ({type(exc).__name__})") from None


def check_thresholds(view: b.BundleView) -> str:
    in_file = _file_metadata(view.root).get("thresholds") or {}
    try:
        tag = json.loads(view.tags.get(TAG_THRESHOLDS, "") or "{}")
    except json.JSONDecodeError:
        raise CheckFailed(f"the registry tag {TAG_THRESHOLDS} is not JSON") from None
    band = b.read_optional(view.root, b.BAND) or {}
    problems = []
    for key in ("t_ok", "t_defect"):
        values = {"ONNX metadata": in_file.get(key), "registry tag": tag.get(key)}
        if band:
            values["band.json"] = band.get(key)
        if len({json.dumps(v) for v in values.values()}) != 1:
            problems.append(f"{key} differs: " + ", ".join(f"{w} {v}" for w, v in values.items()))
    if problems:
        raise CheckFailed("; ".join(problems))
    return (
        f"t_ok {in_file.get('t_ok'):.4g}, t_defect {in_file.get('t_defect'):.4g} agree in the file, "
        "the registry and band.json"
    )


def check_dataset(view: b.BundleView) -> str:
    data = b.read_optional(view.root, b.DATASET)
    if not isinstance(data, dict):
        raise CheckFailed(f"{b.DATASET} is missing")
    try:
        computed = compute_version((r["sha256"], r["label"], r["split"]) for r in data["records"])
    except (KeyError, TypeError) as exc:
        raise CheckFailed(f"{b.DATASET} records are malformed ({exc!r})") from None
    expected = {
        "manifest's own version": data.get("version"),
        f"registry tag {TAG_DATASET_VERSION}": view.tags.get(TAG_DATASET_VERSION),
        "ONNX metadata": _file_metadata(view.root).get("dataset_version"),
    }
    wrong = [f"{where} {_short(v)}" for where, v in expected.items() if v != computed]
    if wrong:
        raise CheckFailed(f"the records hash to {_short(computed)}, but " + ", ".join(wrong))
    return f"{len(data['records'])} images hash to version {_short(computed)}"


def check_metrics(view: b.BundleView) -> str | None:
    metrics = b.read_optional(view.root, b.METRICS)
    if metrics is None:
        return None
    try:
        kpi = json.loads(view.tags.get(TAG_KPI, "") or "{}")
    except json.JSONDecodeError:
        raise CheckFailed(f"the registry tag {TAG_KPI} is not JSON") from None
    records = {"registry tag kensa.kpi": kpi}
    for e in view.events:
        if e.get("action") == "model.register" and e.get("subject") == f"model:{view.name}/{view.version}":
            records[f"model.register event {e.get('id')}"] = (e.get("details") or {}).get("kpi") or {}
    problems, compared = [], 0
    for where, record in records.items():
        for key in AUDITED_FIGURES:
            if isinstance(record, dict) and key in record:
                compared += 1
                if not isinstance(metrics.get(key), int | float) or abs(metrics[key] - record[key]) > 1e-9:
                    problems.append(f"{b.METRICS} {key} = {metrics.get(key)}, {where} says {record[key]}")
    trained_on = metrics.get("trained_on_dataset_version")
    if trained_on and trained_on != view.tags.get(TAG_DATASET_VERSION):
        problems.append(f"{b.METRICS} was made for a model trained on {_short(trained_on)}")
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{compared} audited figures match {b.METRICS}" if compared else "no audited figure to compare"


def check_card(view: b.BundleView) -> str | None:
    made_with = view.info.get("kensa_version")
    if made_with != __version__:
        return None  # another renderer: the text may differ for reasons that are not tampering
    evidence = b.card_evidence(view)
    rendered = ((b.CARD_MD, render_markdown(evidence)), (b.CARD_HTML, render_html(evidence)))
    stale = [
        rel
        for rel, text in rendered
        if not (view.root / rel).is_file() or (view.root / rel).read_text(encoding="utf-8") != text
    ]
    if stale:
        raise CheckFailed(f"{', '.join(stale)} does not match the evidence files it was rendered from")
    return "model card re-renders identically from the evidence files"


def _run(name: str, fn: Callable[[], str | None]) -> Check:
    try:
        detail = fn()
    except CheckFailed as exc:
        return Check(name, False, str(exc))
    except b.BundleError as exc:
        return Check(name, False, str(exc))
    except Exception as exc:  # noqa: BLE001 - a tampered file may break any assumption; never crash
        return Check(name, False, f"evidence is malformed ({type(exc).__name__}: {exc})"[:400])
    if detail is None:
        return Check(name, None, "nothing to check in this bundle")
    return Check(name, True, detail)


def verify_root(root: Path, settings: Settings | None = None) -> list[Check]:
    """Every check on an unpacked bundle folder; ``settings`` adds the live checks."""
    view = b.read_view(root)
    checks = [
        _run("files (MANIFEST.sha256)", lambda: check_manifest(root)),
        _run("audit chain", lambda: check_chain(view)),
        _run("approvals", lambda: check_approvals(view)),
        _run("ONNX sha256", lambda: check_onnx_sha(view)),
        _run("parity (ONNX Runtime)", lambda: check_parity(root)),
        _run("thresholds", lambda: check_thresholds(view)),
        _run("dataset version", lambda: check_dataset(view)),
        _run("metrics vs registration", lambda: check_metrics(view)),
        _run("model card", lambda: check_card(view)),
    ]
    if settings is not None:
        from kensa.governance.verify_live import check_live_registry, check_live_trail

        checks.append(_run("live audit trail", lambda: check_live_trail(view, settings)))
        checks.append(_run("live registry", lambda: check_live_registry(view, settings)))
    return checks


def verify_bundle(archive: Path, settings: Settings | None = None) -> tuple[dict[str, Any], list[Check]]:
    """Unpack ``archive`` and run every check; BundleError when it is not a readable bundle."""
    with tempfile.TemporaryDirectory() as tmp:
        root = b.unpack(archive, Path(tmp))
        info = b.read_json(root, b.BUNDLE_JSON)
        return info, verify_root(root, settings)


__all__ = ["Check", "CheckFailed", "verify_bundle", "verify_root"]
