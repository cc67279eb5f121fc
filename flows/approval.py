"""Waiting for a person: the flow pauses until someone approves or rejects in the Prefect UI."""

from __future__ import annotations

from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from flows.config import Approval
from flows.registry import approve, reject
from kensa.settings import Settings


class ApprovalInput(RunInput):
    """The form the Prefect UI shows on the paused run."""

    approve: bool
    by: str
    role: str = "operator"
    reason: str


def wait_for_approval(
    name: str, version: str, policy: Approval, settings: Settings, timeout_s: int = 24 * 3600
) -> dict[str, str]:
    """Pause this flow run until a person answers; apply the answer under the approval policy."""
    answer = pause_flow_run(
        wait_for_input=ApprovalInput, timeout=timeout_s, key=f"approve-{version}"
    )
    if answer.approve:
        approve(
            name,
            version,
            by=answer.by,
            role=answer.role,
            reason=answer.reason,
            policy=policy,
            settings=settings,
        )
        return {"decision": "approved", "by": answer.by}
    reject(
        name,
        version,
        by=answer.by,
        role=answer.role,
        reason=answer.reason,
        policy=policy,
        settings=settings,
    )
    return {"decision": "rejected", "by": answer.by}
