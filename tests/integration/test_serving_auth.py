"""Closed to strangers: every route × every role and no key; key lifecycle through the CLI.
One real ``kensa serve`` on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from serving_helpers import ROLES, SIZE, Api, serve_api, solid
from sqlalchemy import select

from kensa.store.engine import make_engine, make_session_factory
from kensa.store.models import AuditEvent

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from serve_api(tmp_path_factory.mktemp("serving-auth"))


# ---------------------------------------------------------------- auth matrix

ALL = set(ROLES)
WRITE = {"line", "admin"}
READ = {"operator", "data-scientist", "auditor", "admin"}


def _route_calls(api: Api) -> dict[tuple[str, str], tuple[set[str] | None, Any]]:
    """(method, template) -> (roles allowed, None = public; request thunk taking headers)."""
    base, name = api.server.base, api.model_name
    tensor = {
        "inputs": [
            {
                "name": "images",
                "shape": [1, SIZE, SIZE, 3],
                "datatype": "UINT8",
                "data": np.full(SIZE * SIZE * 3, 255).tolist(),
            }
        ]
    }

    def get(path: str) -> Any:
        return lambda h: httpx.get(base + path, headers=h, timeout=30)

    return {
        ("GET", "/v2/health/live"): (None, get("/v2/health/live")),
        ("GET", "/v2/health/ready"): (None, get("/v2/health/ready")),
        ("POST", "/v1/inspect"): (
            WRITE,
            lambda h: httpx.post(
                f"{base}/v1/inspect",
                content=solid(255),
                headers={**h, "content-type": "image/png"},
                timeout=30,
            ),
        ),
        ("POST", "/v1/inspect/batch"): (
            WRITE,
            lambda h: httpx.post(
                f"{base}/v1/inspect/batch",
                files=[("images", ("a.png", solid(255), "image/png"))],
                headers=h,
                timeout=30,
            ),
        ),
        ("POST", "/v2/models/{name}/infer"): (
            WRITE,
            lambda h: httpx.post(f"{base}/v2/models/{name}/infer", json=tensor, headers=h, timeout=30),
        ),
        ("GET", "/v2"): (ALL, get("/v2")),
        ("GET", "/v2/models/{name}"): (ALL, get(f"/v2/models/{name}")),
        ("GET", "/v2/models/{name}/ready"): (ALL, get(f"/v2/models/{name}/ready")),
        ("GET", "/metrics"): (READ, get("/metrics")),
        ("GET", "/admin/model"): (READ, get("/admin/model")),
        ("POST", "/admin/reload"): (
            {"admin"},
            lambda h: httpx.post(f"{base}/admin/reload", headers=h, timeout=30),
        ),
        ("GET", "/openapi.json"): (ALL, get("/openapi.json")),
    }


def test_auth_matrix_every_route_every_role_and_no_key(api: Api) -> None:
    calls = _route_calls(api)
    spec = httpx.get(f"{api.server.base}/openapi.json", headers=api.headers("auditor")).json()
    declared = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert declared | {("GET", "/openapi.json")} == set(calls)  # a new route needs a row here
    wrong = []
    for (method, route), (allowed, call) in calls.items():
        for role in [*ROLES, None]:
            headers = api.headers(role) if role else {}
            expected = 200 if allowed is None or role in allowed else (401 if role is None else 403)
            r = call(headers)
            if r.status_code != expected:
                wrong.append(f"{method} {route} as {role}: {r.status_code} (expected {expected})")
            if r.status_code in (401, 403):
                assert "error" in r.json()
    assert not wrong, "\n".join(wrong)


def test_unknown_malformed_and_revoked_keys_are_refused(api: Api) -> None:
    from typer.testing import CliRunner

    from kensa.cli import keys as keys_cli

    url = f"{api.server.base}/admin/model"
    assert httpx.get(url, headers={"Authorization": "Bearer kensa_not-a-real-key"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code == 401
    # The real CLI: make a key (printed once), use it, revoke it; it stops working within the
    # key cache time (10 s) — here at once for a key the server has not cached yet.
    env = {"KENSA_DATA_DIR": str(api.data_dir), "KENSA_STORE_URL": api.store_url}
    from kensa.cli.common import get_settings

    get_settings.cache_clear()
    runner = CliRunner()
    made = runner.invoke(keys_cli.app, ["create", "--role", "auditor", "--name", "audit-bot"], env=env)
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("kensa_")
    listed = runner.invoke(keys_cli.app, ["list"], env=env)
    assert "audit-bot" in listed.stdout and key not in listed.stdout
    key_id = next(line.split()[1] for line in listed.stdout.splitlines() if "audit-bot" in line)
    revoked = runner.invoke(keys_cli.app, ["revoke", key_id], env=env)
    assert revoked.exit_code == 0, revoked.output
    get_settings.cache_clear()
    r = httpx.get(url, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_api_key"
    engine = make_engine(api.store_url)
    with make_session_factory(engine)() as s:
        actions = set(s.scalars(select(AuditEvent.action)).all())
    engine.dispose()
    assert {"key.create", "key.revoke", "model.serve"} <= actions
