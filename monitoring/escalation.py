"""Escalation webhook: a JSON POST signed with HMAC-SHA256, retried with exponential backoff.

The receiver checks ``X-Kensa-Signature`` against ``sha256=HEX(HMAC(secret, timestamp + "." +
body))`` where ``timestamp`` is the ``X-Kensa-Timestamp`` header (Unix seconds) and ``body`` the raw
request bytes; ``verify_signature`` does exactly that. Signing the timestamp with the body lets a
receiver refuse replays of an old delivery. Every retry of one delivery carries the same
``X-Kensa-Delivery`` id, so a receiver that saw a delivery already can drop the duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("kensa.monitoring.escalation")

SIGNATURE_HEADER = "X-Kensa-Signature"
TIMESTAMP_HEADER = "X-Kensa-Timestamp"
DELIVERY_HEADER = "X-Kensa-Delivery"
EVENT_HEADER = "X-Kensa-Event"

# Status codes worth another try: the receiver is overloaded or briefly down. Any other 4xx means
# the request itself is wrong (bad URL path, refused signature) and retrying cannot help.
_RETRYABLE_STATUS = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Attempt:
    """One try at delivering a webhook."""

    at: str  # ISO 8601 UTC
    status_code: int | None
    error: str | None
    duration_ms: float


@dataclass
class Delivery:
    """The outcome of delivering one webhook, with every attempt (stored in the alert's details)."""

    delivery_id: str
    target: str  # scheme://host/path only: a token in the query string must not reach logs
    delivered: bool = False
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "delivered" if self.delivered else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "target": self.target,
            "status": self.status,
            "attempts": [asdict(a) for a in self.attempts],
        }


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp`` (Unix seconds, as text)."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    *,
    body: bytes,
    timestamp: str,
    signature: str,
    now: float | None = None,
    tolerance_s: float = 300.0,
) -> bool:
    """True when ``signature`` is ours for ``body`` and ``timestamp`` is within ``tolerance_s``."""
    try:
        sent = float(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment (where webhook tokens usually hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact JSON with sorted keys."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def deliver(
    url: str,
    payload: Mapping[str, Any],
    *,
    secret: str,
    attempts: int = 4,
    backoff_s: float = 0.5,
    timeout_s: float = 5.0,
    event: str = "alert.escalated",
    delivery_id: str | None = None,
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """POST ``payload`` to ``url`` until a 2xx answer, at most ``attempts`` times.

    Waits ``backoff_s``, then twice that, and so on between tries. Connection errors, timeouts,
    5xx, 408, 425 and 429 are retried; other answers end the delivery as failed. Never raises
    for network trouble: the outcome is in the returned ``Delivery``.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1; got {attempts}")
    body = encode_payload(payload)
    outcome = Delivery(delivery_id=delivery_id or uuid.uuid4().hex, target=redact_url(url))
    own_client = client is None
    http = client or httpx.Client(timeout=timeout_s, follow_redirects=False)
    try:
        for number in range(1, attempts + 1):
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "kensa-escalation/1",
                SIGNATURE_HEADER: sign(secret, timestamp, body),
                TIMESTAMP_HEADER: timestamp,
                DELIVERY_HEADER: outcome.delivery_id,
                EVENT_HEADER: event,
            }
            started = time.perf_counter()
            at = datetime.now(UTC).isoformat(timespec="milliseconds")
            status_code: int | None = None
            error: str | None = None
            try:
                response = http.post(url, content=body, headers=headers)
                status_code = response.status_code
            except httpx.HTTPError as exc:
                # The exception's class says what went wrong; its text may echo the URL.
                error = type(exc).__name__
            duration_ms = round((time.perf_counter() - started) * 1000.0, 2)
            outcome.attempts.append(Attempt(at, status_code, error, duration_ms))
            if status_code is not None and 200 <= status_code < 300:
                outcome.delivered = True
                break
            retryable = status_code is None or status_code >= 500 or status_code in _RETRYABLE_STATUS
            log.warning(
                "webhook_attempt_failed",
                extra={
                    "delivery_id": outcome.delivery_id,
                    "target": outcome.target,
                    "attempt": number,
                    "status": status_code,
                    "error": error,
                    "retry": retryable and number < attempts,
                },
            )
            if not retryable:
                break
            if number < attempts:
                sleep(backoff_s * (2 ** (number - 1)))
    finally:
        if own_client:
            http.close()
    log.info(
        "webhook_delivery",
        extra={
            "delivery_id": outcome.delivery_id,
            "target": outcome.target,
            "status": outcome.status,
            "attempts": len(outcome.attempts),
        },
    )
    return outcome
