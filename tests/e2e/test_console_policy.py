"""The console's access rules without a browser: every page has an explicit policy, a page added
without one is closed, and the console cookie and API keys never stand in for each other."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from serving_helpers import build_contract_model, make_keys
from starlette.routing import Mount

from kensa.serving.console.pages import alerts, line, models, review, signin
from kensa.serving.security.auth import CONSOLE_POLICY, CONSOLE_PREFIX, CONSOLE_PUBLIC
from kensa.settings import Settings
from kensa.store.engine import make_engine, make_session_factory

PAGES = (signin, review, alerts, models, line)


@pytest.fixture
def app_and_keys(tmp_path: Path) -> Iterator[tuple[FastAPI, dict[str, str]]]:
    from kensa.serving.app import create_app

    url = f"sqlite:///{tmp_path / 'kensa.db'}"
    keys = make_keys(url)
    settings = Settings(data_dir=tmp_path, store_url=url, session_secret="unit")
    engine = make_engine(url)
    app = create_app(
        settings, model_file=build_contract_model(tmp_path / "m.onnx"), sessions=make_session_factory(engine)
    )
    yield app, keys
    engine.dispose()


def sign_in(client: TestClient, key: str) -> None:
    page = client.get(f"{CONSOLE_PREFIX}/login", headers={"accept": "text/html"})
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    answer = client.post(
        f"{CONSOLE_PREFIX}/login",
        data={"api_key": key, "csrf_token": token.group(1)},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text


def test_every_console_route_has_exactly_one_policy_entry() -> None:
    declared = {
        (method, CONSOLE_PREFIX + (route.path if route.path != "/" else ""))  # type: ignore[attr-defined]
        for module in PAGES
        for route in module.router.routes
        for method in route.methods - {"HEAD"}  # type: ignore[attr-defined]
    }
    declared.add(("GET", f"{CONSOLE_PREFIX}/static/{{path:path}}"))
    assert declared == set(CONSOLE_POLICY) | CONSOLE_PUBLIC  # a new page needs a decision; no stale ones
    assert not set(CONSOLE_POLICY) & CONSOLE_PUBLIC
    assert all("line" not in roles for roles in CONSOLE_POLICY.values())  # machines have no pages


def test_a_console_page_added_without_a_policy_is_closed(
    app_and_keys: tuple[FastAPI, dict[str, str]],
) -> None:
    app, keys = app_and_keys
    console = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == CONSOLE_PREFIX)

    @console.get("/forgotten")
    def forgotten() -> dict[str, str]:
        return {"secret": "should never be served"}

    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get(f"{CONSOLE_PREFIX}/forgotten").status_code == 401  # not signed in
        sign_in(client, keys["admin"])
        answer = client.get(f"{CONSOLE_PREFIX}/forgotten")
        assert answer.status_code == 403
        assert answer.json()["error"] == "forbidden" and "no policy" in answer.json()["detail"]


def test_cookie_and_api_key_never_stand_in_for_each_other(
    app_and_keys: tuple[FastAPI, dict[str, str]],
) -> None:
    app, keys = app_and_keys
    with TestClient(app, base_url="http://127.0.0.1") as client:
        # A bearer key opens no console page: people sign in.
        bearer = {"Authorization": f"Bearer {keys['admin']}"}
        assert client.get(f"{CONSOLE_PREFIX}/models", headers=bearer).status_code == 401
        sign_in(client, keys["admin"])
        assert client.get(f"{CONSOLE_PREFIX}/line/panel").status_code == 200
        cookie = client.cookies.get("kensa_console")
        assert cookie
        # The console cookie opens no API route (so no cross-site form can drive the API).
        answer = client.get("/admin/model", headers={"cookie": f"kensa_console={cookie}"})
        assert answer.status_code == 401 and answer.json()["error"] == "missing_api_key"


def test_bad_console_input_is_a_clear_4xx(app_and_keys: tuple[FastAPI, dict[str, str]]) -> None:
    app, keys = app_and_keys
    with TestClient(app, base_url="http://127.0.0.1") as client:
        sign_in(client, keys["operator"])
        page = client.get(f"{CONSOLE_PREFIX}/line", headers={"accept": "text/html"})
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        cases = [
            ("get", f"{CONSOLE_PREFIX}/line/panel?minutes=7", 422, "invalid_window"),
            ("get", f"{CONSOLE_PREFIX}/alerts?status=lost", 422, "invalid_filter"),
            ("get", f"{CONSOLE_PREFIX}/alerts/999", 404, "unknown_alert"),
            ("get", f"{CONSOLE_PREFIX}/review/999/image", 404, "unknown_review_item"),
            ("get", f"{CONSOLE_PREFIX}/models/abc", 422, "invalid_request"),
            ("post", f"{CONSOLE_PREFIX}/review/999/label", 404, "unknown_review_item"),
            ("post", f"{CONSOLE_PREFIX}/alerts/999/resolve", 404, "unknown_alert"),
            ("post", f"{CONSOLE_PREFIX}/models/1/approve", 422, "reason_required"),
        ]
        for method, url, status, code in cases:
            data = {"csrf_token": token.group(1), "label": "ok"} if method == "post" else None
            answer = client.request(method.upper(), url, data=data)
            assert (answer.status_code, answer.json()["error"]) == (status, code), (url, answer.text)
            assert "Traceback" not in answer.text and "/work" not in answer.text
        # The same errors come back as a page for a browser.
        page = client.get(f"{CONSOLE_PREFIX}/alerts/999", headers={"accept": "text/html"})
        assert page.status_code == 404 and "alert 999 does not exist" in page.text
