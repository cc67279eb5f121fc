"""Approve, reject and roll back from the console: the project's approval policy (read from the
``[approval]`` table of kensa.toml) and kensa.governance.approvals, the same rules the CLI and flows obey."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from kensa.governance import approvals
from kensa.governance.approvals import Approval, ApprovalError
from kensa.settings import Settings

T = TypeVar("T")

# kensa.governance.approvals talks to MLflow through its process-global tracking URI; the console points it
# at the settings' registry for the duration of one decision, one decision at a time.
_MLFLOW_LOCK = threading.Lock()


class PolicyError(ValueError):
    """The project config cannot be read, so no decision is allowed (fail closed)."""


def load_policy(settings: Settings) -> Approval:
    """The approval policy of the project (defaults when no project config is set)."""
    path = settings.project_config
    if path is None:
        return Approval()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"the project config {path.name} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"the project config {path.name} is not valid TOML: {exc}") from None
    try:
        return Approval.model_validate(raw.get("approval", {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"approval.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise PolicyError(f"the [approval] table of {path.name} is invalid: {problems}") from None


def may_decide(role: str, policy: Approval) -> bool:
    return role in policy.approver_roles


def _in_registry(settings: Settings, call: Callable[[], T]) -> T:
    import mlflow

    uri = settings.resolved_mlflow_uri
    with _MLFLOW_LOCK:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        return call()


def _first_line(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return str(message).strip().splitlines()[0][:300] if str(message).strip() else type(exc).__name__


class DecisionError(Exception):
    """A decision refused: 403 for the policy, 404 for an unknown version, 409 for its state."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def decide(action: str, settings: Settings, **kwargs: Any) -> Any:
    """Run ``kensa.governance.approvals.<action>`` (approve, reject, rollback) under the project's policy."""
    from mlflow.exceptions import MlflowException

    try:
        policy = load_policy(settings)
    except PolicyError as exc:
        raise DecisionError(503, "policy_unavailable", str(exc)) from None
    functions: dict[str, Callable[..., Any]] = {
        "approve": approvals.approve,
        "reject": approvals.reject,
        "rollback": approvals.rollback,
    }
    function = functions[action]
    try:
        return _in_registry(settings, lambda: function(policy=policy, settings=settings, **kwargs))
    except ApprovalError as exc:
        raise DecisionError(403, "not_allowed", str(exc)) from None
    except MlflowException as exc:
        missing = "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", ""))
        status, code = (404, "unknown_version") if missing else (409, "registry_refused")
        raise DecisionError(status, code, _first_line(exc)) from None
