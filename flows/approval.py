"""Waiting for a person: the flow pauses until someone approves or rejects in the Prefect UI."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from kensa.flows.config import Approval
from kensa.flows.register import ApprovalError, approve, reject
from kensa.settings import Settings


class ApprovalInput(RunInput):
    """The form the Prefect UI shows on the paused run."""

    approve: bool
    by: str
    role: str = "operator"
    reason: str


def wait_for_approval(
    name: str,
    version: str,
    policy: Approval,
    settings: Settings,
    timeout_s: int = 24 * 3600,
    max_attempts: int = 5,
) -> dict[str, str]:
    """Pause this flow run until a person answers; apply the answer under the approval policy.

    An answer the policy refuses (the registrant approving their own model, a role that may not
    approve, no reason) is logged and the run pauses again for another answer.
    """
    logger = get_run_logger()
    for attempt in range(max_attempts):
        # Prefect skips a pause whose key was already used, so each attempt gets its own key.
        key = f"approve-{version}" if attempt == 0 else f"approve-{version}-{attempt}"
        answer = pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s, key=key)
        try:
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
        except ApprovalError as exc:
            logger.warning("answer refused (%s); waiting for another answer", exc)
    msg = f"no acceptable answer for {name}/{version} after {max_attempts} attempts"
    raise ApprovalError(msg)
