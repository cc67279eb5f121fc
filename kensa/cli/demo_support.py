"""What the demo needs around the kensa commands: a served process, a webhook receiver, keys."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from kensa.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_key(settings: Settings, role: str, name: str) -> str:
    """Issue an API key in the store (audited like `kensa keys create`); returns the plaintext."""
    from kensa.store.audit import append_event
    from kensa.store.connect import open_store
    from kensa.store.keys import create_key

    with open_store(settings)() as session:
        plaintext, row = create_key(session, name=name, role=role)
        append_event(
            session, actor="kensa-demo", action="key.create", subject=f"key:{row.id}",
            details={"role": role, "name": name},
        )  # fmt: skip
        session.commit()
    return plaintext


@dataclass
class WebhookReceiver:
    """A local stand-in for the plant's paging system: records escalations, checks signatures."""

    secret: str
    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/kensa-escalations"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                valid = receiver._valid(self.headers, body)
                receiver.received.append({"headers": dict(self.headers), "body": body, "valid": valid})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # keep the demo's output clean
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _valid(self, headers: Any, body: bytes) -> bool:
        from kensa.monitoring.escalation import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature

        return verify_signature(
            self.secret,
            body=body,
            timestamp=headers.get(TIMESTAMP_HEADER, ""),
            signature=headers.get(SIGNATURE_HEADER, ""),
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def alerts(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.received]


class ServedProcess:
    """`kensa serve` as its own process, the way a plant runs it; stopped when the demo ends."""

    def __init__(self, port: int, registry_name: str, log_path: Path, env: dict[str, str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        cmd = [sys.executable, "-m", "kensa.cli.main", "serve", "--registry-name", registry_name,
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self._log, stderr=self._log)

    def wait_ready(self, timeout_s: float = 120) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kensa serve exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"kensa serve not ready in {timeout_s:.0f} s; see {self._log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
