"""Body size limit, enforced as ASGI middleware before anything parses the request.

A declared Content-Length over the limit is refused without reading a byte; a chunked body is
counted as it arrives and refused the moment it passes the limit. The accepted body is handed
on in one piece (an image must be whole before it can be decoded anyway).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kensa.serving.errors import send_error


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


class BodyLimitMiddleware:
    """Answer 413 for bodies over ``max_bytes`` (Content-Length or chunked)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        declared = _content_length(scope)
        if declared is not None and declared < 0:
            await send_error(send, path, 400, "bad_content_length", "Content-Length is not a number")
            return
        if declared is not None and declared > self.max_bytes:
            await send_error(
                send,
                path,
                413,
                "body_too_large",
                f"the body declares {declared:,} bytes; at most {self.max_bytes:,} are accepted",
            )
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; there is nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_error(
                    send,
                    path,
                    413,
                    "body_too_large",
                    f"the body is over the limit of {self.max_bytes:,} bytes",
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for disconnect, as Starlette expects

        await self.app(scope, replay, send)
