"""Escalation webhook against a real HTTP receiver on 127.0.0.1: signed, retried, recorded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from kensa.monitoring.alerts import escalate, get_alert, open_alert, retry_failed_webhooks
from kensa.monitoring.escalation import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from kensa.settings import Settings
from kensa.store.audit import verify_chain
from kensa.store.connect import open_store
from kensa.store.models import AuditEvent

pytestmark = pytest.mark.integration
SECRET = "s3cret-for-tests"


class Receiver:
    """A webhook endpoint answering from a script of status codes (then 200), recording requests."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                code = outer.script.pop(0) if outer.script else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/kensa?token=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([503, 500])
    yield r
    r.close()


def _settings(tmp_path: Path, url: str) -> Settings:
    return Settings(data_dir=tmp_path, webhook_url=url, webhook_secret=SECRET, webhook_backoff_s=0.05)


def _alert(settings: Settings) -> int:
    with open_store(settings)() as session:
        alert = open_alert(session, level="critical", kind="drift", cause="brightness -8σ", line_id="L1")
        session.commit()
        return alert.id


def test_escalation_reaches_the_receiver_signed_after_retries(tmp_path: Path, receiver: Receiver) -> None:
    settings = _settings(tmp_path, receiver.url)
    alert_id = _alert(settings)
    with open_store(settings)() as session:
        alert = escalate(session, alert_id, by="ann", settings=settings, comment="line 1 needs eyes")
        assert receiver.requests == []  # nothing leaves before the change is committed
        session.commit()
        # The caller's object shows the outcome once commit returns.
        assert alert.details["webhook"]["status"] == "delivered"
    assert len(receiver.requests) == 3  # 503, 500, then 200
    deliveries = {headers[DELIVERY_HEADER] for headers, _ in receiver.requests}
    assert len(deliveries) == 1  # every retry is the same delivery, so a receiver can dedupe
    headers, body = receiver.requests[-1]
    assert verify_signature(
        SECRET, body=body, timestamp=headers[TIMESTAMP_HEADER], signature=headers[SIGNATURE_HEADER]
    )
    assert not verify_signature(
        "wrong", body=body, timestamp=headers[TIMESTAMP_HEADER], signature=headers[SIGNATURE_HEADER]
    )
    assert not verify_signature(
        SECRET, body=body + b" ", timestamp=headers[TIMESTAMP_HEADER], signature=headers[SIGNATURE_HEADER]
    )
    payload = json.loads(body)
    assert (payload["id"], payload["status"], payload["escalated_by"]) == (alert_id, "escalated", "ann")
    with open_store(settings)() as session:
        hook = get_alert(session, alert_id).details["webhook"]
        assert [a["status_code"] for a in hook["attempts"]] == [503, 500, 200]
        assert "token" not in hook["target"]  # the URL's secret query never reaches the store
        events = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
        assert events[-2:] == ["alert.escalate", "alert.webhook"]
        assert verify_chain(session) == []


def test_a_receiver_that_stays_down_is_retried_on_the_next_run(tmp_path: Path) -> None:
    down = Receiver([])
    url = down.url
    down.close()  # nothing listens on that port any more
    settings = _settings(tmp_path, url)
    alert_id = _alert(settings)
    with open_store(settings)() as session:
        escalate(session, alert_id, by="ann", settings=settings)
        session.commit()
    with open_store(settings)() as session:
        hook = get_alert(session, alert_id).details["webhook"]
        assert hook["status"] == "failed"
        assert len(hook["attempts"]) == settings.webhook_attempts
        assert all(a["error"] == "ConnectError" for a in hook["attempts"])
    back = Receiver([])
    try:
        retry_settings = _settings(tmp_path, back.url)
        with open_store(retry_settings)() as session:
            assert retry_failed_webhooks(session, retry_settings) == [alert_id]
            session.commit()
        assert len(back.requests) == 1
        with open_store(settings)() as session:
            hook = get_alert(session, alert_id).details["webhook"]
            assert hook["status"] == "delivered"
            assert len(hook["attempts"]) == settings.webhook_attempts + 1
    finally:
        back.close()


def test_a_refusing_receiver_is_not_hammered_and_a_rollback_sends_nothing(tmp_path: Path) -> None:
    refusing = Receiver([401])
    try:
        settings = _settings(tmp_path, refusing.url)
        alert_id = _alert(settings)
        with open_store(settings)() as session:
            escalate(session, alert_id, by="ann", settings=settings)
            session.rollback()  # the escalation never happened, so nobody is told it did
        assert refusing.requests == []
        with open_store(settings)() as session:
            alert = escalate(session, alert_id, by="ann", settings=settings)
            session.commit()
            assert alert.details["webhook"]["status"] == "failed"
        assert len(refusing.requests) == 1  # 401 means the request is wrong: retrying cannot help
    finally:
        refusing.close()
