"""Who may promote a model: approve, reject and roll back in the MLflow registry, each audited.

Flows (the approval step of the pilot) and the console (the approve button) both call these, so the
rules (roles, the two-person rule, no second life for a rejected version) live in one place.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kensa.registry import ALIAS_CANDIDATE, ALIAS_CHAMPION, TAG_REGISTERED_BY, TAG_SHA256, TAG_STATUS
from kensa.settings import Settings
from kensa.store.audit import append_event
from kensa.store.connect import open_store
from kensa.store.models import ROLES

# Roles no approval policy may name: the read-only auditor, and machines (line keys).
NON_APPROVER_ROLES = frozenset({"auditor", "line"})

TAG_PREVIOUS_CHAMPION = "kensa.previous_champion"


class Approval(BaseModel):
    """The approval policy of a project (``[approval]`` in kensa.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    two_person: bool = True
    approver_roles: list[str] = Field(default_factory=lambda: ["admin", "operator"])

    @field_validator("approver_roles")
    @classmethod
    def _known_and_not_read_only(cls, roles: list[str]) -> list[str]:
        # Whatever a project config says, the auditor changes nothing and a line's key (a camera
        # or PLC) is not a person who can be accountable for a promotion.
        allowed = [r for r in ROLES if r not in NON_APPROVER_ROLES]
        bad = ", ".join(repr(r) for r in roles if r not in allowed)
        if bad:
            msg = f"approver_roles: {bad} cannot approve; choose from {', '.join(allowed)}"
            raise ValueError(msg)
        if not roles:
            raise ValueError("approver_roles: at least one role must be able to approve")
        return roles


class ApprovalError(PermissionError):
    """An approval the policy does not allow (role, two-person rule, wrong state)."""


def audit_model_event(
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
    audit_model_event(
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
    audit_model_event(settings, by, "model.reject", name, version, {"reason": reason, "role": role})


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
    audit_model_event(
        settings,
        by,
        "model.rollback",
        name,
        previous,
        {"reason": reason, "role": role, "from_version": current},
    )
    return current, previous
