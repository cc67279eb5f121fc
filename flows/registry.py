"""The MLflow registry side of kensa: register candidates, approve, reject, roll back — audited."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import onnx
from mlflow.tracking import MlflowClient

from flows.config import Approval
from kensa import __version__
from kensa.registry import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
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
from kensa.store.audit import append_event
from kensa.store.connect import open_store
from models.export import read_metadata, sha256_file, working_providers

TAG_PREVIOUS_CHAMPION = "kensa.previous_champion"


class ApprovalError(PermissionError):
    """An approval the policy does not allow (role, two-person rule, wrong state)."""


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
) -> Registered:
    """Log the ONNX file to the active run, register it and point ``candidate`` at it.

    The SHA-256 recorded is that of the file as stored in the registry, which is what serving
    verifies after download.
    """
    meta = read_metadata(onnx_path)
    info = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name=MODEL_ARTIFACT,
        registered_model_name=name,
        save_as_external_data=False,
        onnx_execution_providers=working_providers(),
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
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, ALIAS_CANDIDATE, version)
    _audit(
        settings,
        registered_by,
        "model.register",
        name,
        version,
        {"sha256": digest, "source": source, "kpi": kpi},
    )
    return Registered(name, version, digest)


def _audit(
    settings: Settings, actor: str, action: str, name: str, version: str, details: dict[str, Any]
) -> None:
    factory = open_store(settings)
    with factory() as session:
        append_event(session, actor=actor, action=action, subject=f"model:{name}/{version}", details=details)
        session.commit()


def _require_role(role: str, policy: Approval, verb: str) -> None:
    if role not in policy.approver_roles:
        msg = f"role {role!r} may not {verb}; allowed: {', '.join(policy.approver_roles)}"
        raise ApprovalError(msg)


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def approve(
    name: str,
    version: str,
    *,
    by: str,
    role: str,
    reason: str,
    policy: Approval,
    settings: Settings,
) -> str | None:
    """Make ``version`` the champion; returns the previous champion's version (or None).

    Policy: the approver's role must be allowed, and with two-person approval on, the person
    who registered a model cannot approve it.
    """
    client = MlflowClient()
    mv = client.get_model_version(name, version)
    _require_role(role, policy, "approve models")
    registrant = mv.tags.get(TAG_REGISTERED_BY, "")
    if policy.two_person and registrant and registrant == by:
        msg = (
            f"two-person approval: {by} registered {name}/{version} and cannot approve it; "
            "another person must"
        )
        raise ApprovalError(msg)
    if mv.tags.get(TAG_STATUS) == "rejected":
        msg = f"{name}/{version} was rejected; register a new candidate instead"
        raise ApprovalError(msg)
    if not reason.strip():
        msg = "an approval needs a reason"
        raise ApprovalError(msg)
    previous = _alias_version(client, name, ALIAS_CHAMPION)
    client.set_registered_model_alias(name, ALIAS_CHAMPION, version)
    client.set_model_version_tag(name, version, TAG_STATUS, "approved")
    if previous and previous != version:
        client.set_model_version_tag(name, version, TAG_PREVIOUS_CHAMPION, previous)
        client.set_model_version_tag(name, previous, TAG_STATUS, "retired")
    if _alias_version(client, name, ALIAS_CANDIDATE) == version:
        client.delete_registered_model_alias(name, ALIAS_CANDIDATE)
    _audit(
        settings,
        by,
        "model.approve",
        name,
        version,
        {
            "reason": reason,
            "role": role,
            "previous_champion": previous,
            "sha256": mv.tags.get(TAG_SHA256),
        },
    )
    return previous


def reject(
    name: str,
    version: str,
    *,
    by: str,
    role: str,
    reason: str,
    policy: Approval,
    settings: Settings,
) -> None:
    """Mark a candidate rejected (it keeps its history; it never gets an alias again)."""
    client = MlflowClient()
    _require_role(role, policy, "reject models")
    if _alias_version(client, name, ALIAS_CHAMPION) == version:
        msg = f"{name}/{version} is the champion; roll back or approve another version first"
        raise ApprovalError(msg)
    client.get_model_version(name, version)  # raises for an unknown version
    client.set_model_version_tag(name, version, TAG_STATUS, "rejected")
    if _alias_version(client, name, ALIAS_CANDIDATE) == version:
        client.delete_registered_model_alias(name, ALIAS_CANDIDATE)
    _audit(settings, by, "model.reject", name, version, {"reason": reason, "role": role})


def rollback(
    name: str, *, by: str, role: str, reason: str, policy: Approval, settings: Settings
) -> tuple[str, str]:
    """Point ``champion`` back at the version it replaced; returns (from, to)."""
    client = MlflowClient()
    _require_role(role, policy, "roll back")
    current = _alias_version(client, name, ALIAS_CHAMPION)
    if current is None:
        msg = f"{name} has no champion to roll back"
        raise ApprovalError(msg)
    previous = client.get_model_version(name, current).tags.get(TAG_PREVIOUS_CHAMPION)
    if not previous:
        msg = f"{name}/{current} has no previous champion to return to"
        raise ApprovalError(msg)
    client.set_registered_model_alias(name, ALIAS_CHAMPION, previous)
    client.set_model_version_tag(name, previous, TAG_STATUS, "approved")
    client.set_model_version_tag(name, current, TAG_STATUS, "retired")
    _audit(
        settings,
        by,
        "model.rollback",
        name,
        previous,
        {"reason": reason, "role": role, "from_version": current},
    )
    return current, previous
