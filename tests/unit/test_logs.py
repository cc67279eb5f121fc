"""Logs as data: JSON lines with fields, the request id on every serving line, never a secret."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr
from serving_helpers import build_contract_model, encode, make_keys

from kensa.logs import JsonFormatter, TextFormatter, bound, configure_logging, request_id


def _record(msg: str = "something_happened", *, exc: bool = False, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("kensa.test")
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), exc_info, extra=extra)


def test_a_line_is_one_json_object_with_the_event_and_its_fields() -> None:
    line = JsonFormatter().format(_record(model_version="3", rows=2, path=Path("/a b"), level_of_what="x"))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["event"] == "something_happened" and doc["level"] == "WARNING"
    assert doc["logger"] == "kensa.test" and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", doc["ts"])
    assert doc["model_version"] == "3" and doc["rows"] == 2 and doc["path"] == "/a b"


def test_a_field_never_overwrites_the_line_s_own_level_or_event() -> None:
    doc = json.loads(JsonFormatter().format(_record(level="critical", event="x")))
    assert doc["level"] == "WARNING" and doc["field_level"] == "critical"
    assert doc["event"] == "something_happened" and doc["field_event"] == "x"


def test_an_exception_rides_in_one_line_with_its_traceback() -> None:
    line = JsonFormatter().format(_record("failed", exc=True))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["exc_type"] == "ValueError" and "Traceback" in doc["exc"] and "boom" in doc["exc"]


def test_bound_fields_join_every_line_in_the_context_and_leave_with_it() -> None:
    fmt = JsonFormatter()
    assert request_id() is None
    with bound(request_id="r1"):
        with bound(client_request_id="c1"):
            inner = json.loads(fmt.format(_record()))
        assert request_id() == "r1"
    outer = json.loads(fmt.format(_record()))
    assert inner["request_id"] == "r1" and inner["client_request_id"] == "c1"
    assert "request_id" not in outer and request_id() is None


def test_secrets_are_redacted_by_field_name_and_in_free_text() -> None:
    key = "kensa_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    record = _record(
        f"auth failed for Bearer {key}",
        api_key=key,
        authorization=f"Bearer {key}",
        webhook_secret=SecretStr("whsec"),
        session_secret="sess-secret-value",
        nested={"token": "tok-value", "ok": key},
        key_id=7,
    )
    for fmt in (JsonFormatter(), TextFormatter()):
        line = fmt.format(record)
        for secret in (key, "whsec", "sess-secret-value", "tok-value"):
            assert secret not in line, (type(fmt).__name__, line)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["api_key"] == doc["authorization"] == doc["session_secret"] == "[redacted]"
    assert doc["key_id"] == 7  # a key's id is not the key


def test_the_key_pattern_matches_the_keys_kensa_makes() -> None:
    from kensa.logs import redact_text
    from kensa.store.keys import KEY_PREFIX

    assert KEY_PREFIX == "kensa_"
    assert redact_text(f"x {KEY_PREFIX}{'a' * 43} y") == "x [redacted] y"
    assert redact_text("kensa_contract kensa-decode") == "kensa_contract kensa-decode"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Give back the root logger and uvicorn's loggers as they were (pytest's handlers included)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    uvicorn = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in ("uvicorn.error",)
    }
    alembic = logging.getLogger("alembic").level
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, (handlers, propagate) in uvicorn.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
        logging.getLogger("alembic").setLevel(alembic)


@pytest.mark.usefixtures("root_logging")
def test_configure_logging_sends_kensa_and_uvicorn_through_one_format() -> None:
    stream = io.StringIO()
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler(io.StringIO()))
    logging.getLogger("uvicorn.error").propagate = False
    configure_logging("info", "json", stream=stream)
    configure_logging("info", "json", stream=stream)  # again: reconfigures, never doubles
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42, extra={"color_message": "x"})
    logging.getLogger("kensa.serving.x").debug("too_quiet")
    logging.getLogger("kensa.serving.x").info("verdict", extra={"model_version": "2"})
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(d["logger"], d["event"]) for d in docs] == [
        ("uvicorn.error", "Started server process [42]"),
        ("kensa.serving.x", "verdict"),
    ]
    assert docs[1]["model_version"] == "2" and "color_message" not in docs[0]

    text = io.StringIO()
    configure_logging("INFO", "text", stream=text)
    logging.getLogger("kensa.serving.x").info("verdict", extra={"model_version": "2", "note": "a b"})
    assert re.fullmatch(
        r'ts=\S+ level=INFO logger=kensa.serving.x event=verdict model_version=2 note="a b"\n',
        text.getvalue(),
    )
    with pytest.raises(ValueError, match="auto, json, text"):
        configure_logging("INFO", "xml")  # type: ignore[arg-type]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_text_for_a_person_at_a_terminal_and_json_for_everything_else() -> None:
    piped, terminal = io.StringIO(), _Terminal()
    configure_logging("INFO", "auto", stream=piped)
    logging.getLogger("kensa.cli").info("trained")
    configure_logging("INFO", "auto", stream=terminal)
    logging.getLogger("kensa.cli").info("trained")
    assert json.loads(piped.getvalue())["event"] == "trained"
    assert re.fullmatch(r"ts=\S+ level=INFO logger=kensa.cli event=trained\n", terminal.getvalue())


@pytest.fixture
def captured(root_logging: None) -> Iterator[io.StringIO]:
    """Every line any logger writes during the test, as the JSON the server would write."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream


@pytest.mark.filterwarnings("ignore:Using `httpx`")
def test_serving_lines_carry_the_request_id_and_model_version_and_never_a_secret(
    tmp_path: Path, captured: io.StringIO
) -> None:
    from fastapi.testclient import TestClient

    from kensa.serving.app import create_app
    from kensa.serving.console.session import CSRF_FIELD
    from kensa.settings import Settings

    store = f"sqlite:///{tmp_path / 'kensa.db'}"
    keys = make_keys(store, ["line", "auditor"])
    session_secret, webhook_secret = "session-secret-" + "s" * 24, "webhook-secret-" + "w" * 24
    settings = Settings(
        data_dir=tmp_path,
        store_url=store,
        session_secret=session_secret,
        webhook_secret=SecretStr(webhook_secret),
    )
    app = create_app(settings, model_file=build_contract_model(tmp_path / "m.onnx"))
    white = encode(np.full((32, 32, 3), 255, np.uint8))
    with TestClient(app) as client:
        line = {"Authorization": f"Bearer {keys['line']}"}
        one = client.post(
            "/v1/inspect",
            content=white,
            headers={**line, "content-type": "image/png", "X-Request-ID": "camera-7:42"},
        )
        batch = client.post("/v1/inspect/batch", files=[("images", white), ("images", white)], headers=line)
        refused = client.post(
            "/v1/inspect", content=white, headers={"Authorization": f"Bearer {keys['auditor']}"}
        )
        unknown = client.get("/admin/model", headers={"Authorization": "Bearer kensa_" + "x" * 40})
        # A person signs in to the console with a key in a form (and gets a signed cookie).
        page = client.get("/console/login")
        csrf = re.search(rf'name="{CSRF_FIELD}" value="([^"]+)"', page.text)
        assert csrf is not None
        signed_in = client.post(
            "/console/login",
            data={"api_key": keys["auditor"], CSRF_FIELD: csrf.group(1)},
            follow_redirects=False,
        )
    assert one.status_code == 200 and batch.status_code == 200
    assert refused.status_code == 403 and unknown.status_code == 401 and signed_in.status_code == 303

    text = captured.getvalue()
    docs = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    for secret in (*keys.values(), session_secret, webhook_secret):
        assert secret not in text
    assert "Authorization" not in text and "Bearer" not in text

    verdicts = [d for d in docs if d["event"] == "verdict"]
    rid = one.headers["x-request-id"]
    assert one.json()["request_id"] == rid
    [first] = [d for d in verdicts if d["request_id"] == rid]
    assert first["client_request_id"] == "camera-7:42" and first["prediction_id"] == rid
    assert first["model_version"] == one.json()["model_version"] and first["verdict"] == "ok"
    batch_id = batch.headers["x-request-id"]
    batch_lines = [d for d in verdicts if d["request_id"] == batch_id]
    assert sorted(d["prediction_id"] for d in batch_lines) == [f"{batch_id}-0", f"{batch_id}-1"]
    assert [r["request_id"] for r in batch.json()["results"]] == [f"{batch_id}-0", f"{batch_id}-1"]
    assert all(d["model_version"] == one.json()["model_version"] for d in batch_lines)
    [forbidden] = [d for d in docs if d["event"] == "forbidden"]
    assert forbidden["request_id"] == refused.headers["x-request-id"] and forbidden["role"] == "auditor"
    [sign_in] = [d for d in docs if d["event"] == "console_sign_in"]
    assert sign_in["request_id"] == signed_in.headers["x-request-id"] and sign_in["role"] == "auditor"
