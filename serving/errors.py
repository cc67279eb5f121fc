"""Errors the service answers with: one exception type, rendered as kensa or Open Inference JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.types import Send

# Routes under this prefix speak the Open Inference Protocol v2, whose error body is
# {"error": "<message>"}; every other route answers {"error": <code>, "detail": <message>}.
V2_PREFIX = "/v2"

ACCEPTED_FORMATS = "JPEG, PNG or BMP"


class ApiError(Exception):
    """A request the service refuses, with the HTTP status, a stable code and a human message.

    ``detail`` names what was wrong and what is accepted; it never carries a path or a trace.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})


def error_body(path: str, code: str, detail: str) -> dict[str, str]:
    """The JSON body of an error for a request to ``path``."""
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        return {"error": f"{code}: {detail}"}
    return {"error": code, "detail": detail}


def error_bytes(path: str, code: str, detail: str) -> bytes:
    return json.dumps(error_body(path, code, detail)).encode("utf-8")


async def send_error(
    send: Send,
    path: str,
    status: int,
    code: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer an error straight from ASGI middleware (before FastAPI has seen the request)."""
    body = error_bytes(path, code, detail)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
