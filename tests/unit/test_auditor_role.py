"""The auditor role reads (bundles, reports, the registry) and can change nothing."""

from __future__ import annotations

from kensa.governance.approvals import Approval
from kensa.serving.security import auth

# Signing out changes the caller's own session cookie, nothing in the store or the registry.
HARMLESS_WRITES = {("POST", "/console/logout")}
READ_METHODS = {"GET", "HEAD"}


def _policies() -> dict[tuple[str, str], frozenset[str]]:
    # The console's table joins the API's once the console is part of serving.
    return {**auth.POLICY, **getattr(auth, "CONSOLE_POLICY", {})}


def test_no_route_that_changes_state_admits_the_auditor() -> None:
    writable = sorted(
        f"{method} {path}"
        for (method, path), roles in _policies().items()
        if "auditor" in roles and method not in READ_METHODS and (method, path) not in HARMLESS_WRITES
    )
    assert writable == []


def test_the_auditor_reads_the_model_and_metrics() -> None:
    policies = _policies()
    for route in (("GET", "/admin/model"), ("GET", "/metrics"), ("GET", "/v2/models/{name}")):
        assert "auditor" in policies[route], route
    assert "auditor" not in policies[("POST", "/admin/reload")]


def test_the_default_approval_policy_excludes_the_auditor() -> None:
    assert "auditor" not in Approval().approver_roles
