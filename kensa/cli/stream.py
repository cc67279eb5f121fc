"""The client behind ``kensa line stream``: send a simulated line's parts to a running service.

Parts are rendered in a worker thread (``models.line.stream``) and posted concurrently to
``POST /v1/inspect``, each with its own ``Idempotency-Key`` so a retried request is answered from
the prediction log instead of judged twice. Connection errors, timeouts and 503 (queue full, no
model yet) are retried with backoff; a refused key stops the stream at once. The summary counts
verdicts by model version (and before/after the shift), with the escapes and false rejects the
line's own labels reveal.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx

from kensa.models.line.conditions import LineConditions
from kensa.models.line.stream import StreamPart, StreamPlan, render_part

# Most seconds one Retry-After may make a part wait: a stream should not stall for a minute.
_MAX_RETRY_AFTER_S = 5.0
_RENDER_CHUNK = 32  # parts rendered per hop to the worker thread


class StreamError(RuntimeError):
    """The stream cannot go on: service unreachable or the key refused. ``invalid``: user input."""

    def __init__(self, message: str, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


@dataclass(frozen=True)
class Sent:
    """What happened to one part."""

    index: int
    part_id: str
    label: str
    shifted: bool
    status: int | None  # HTTP status of the final attempt; None = never answered
    verdict: str | None = None
    model: str | None = None  # "name/version" that judged it
    replayed: bool = False
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0  # round trip of the final attempt


@dataclass
class StreamSummary:
    """Every part's outcome plus the run's key prefix and wall time."""

    plan: StreamPlan
    run_key: str
    results: list[Sent] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def judged(self) -> list[Sent]:
        return [r for r in self.results if r.verdict is not None]

    @property
    def errors(self) -> list[Sent]:
        return [r for r in self.results if r.verdict is None]

    @property
    def retries(self) -> int:
        return sum(r.attempts - 1 for r in self.results)

    def by_model(self) -> list[dict[str, Any]]:
        """One row per (model version, phase): verdict counts, escapes and false rejects."""
        rows: dict[tuple[str, str], Counter[str]] = {}
        for r in self.judged:
            phase = "after shift" if r.shifted else ("before shift" if self.plan.shift else "")
            c = rows.setdefault((r.model or "?", phase), Counter())
            c[r.verdict or "?"] += 1
            c["parts"] += 1
            c["escapes"] += int(r.label != "ok" and r.verdict == "ok")
            c["defective"] += int(r.label != "ok")
            c["false_rejects"] += int(r.label == "ok" and r.verdict == "defect")
            c["good"] += int(r.label == "ok")
        return [
            {"model": m, "phase": p, **{k: c[k] for k in _COUNT_KEYS}} for (m, p), c in sorted(rows.items())
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan.describe(),
            "run_key": self.run_key,
            "seconds": self.seconds,
            "sent": len(self.results),
            "judged": len(self.judged),
            "errors": len(self.errors),
            "retries": self.retries,
            "by_model": self.by_model(),
        }


_COUNT_KEYS = ("parts", "ok", "defect", "review", "escapes", "defective", "false_rejects", "good")


def inspect_url(url: str) -> str:
    """``http://host:port`` (or the full ``.../v1/inspect``) → the inspect endpoint."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StreamError(
            f"--url must be the service's http(s) address, e.g. http://127.0.0.1:8000; got {url!r}",
            invalid=True,
        )
    base = url.strip().rstrip("/")
    return base if base.endswith("/v1/inspect") else base + "/v1/inspect"


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('error')}: {body.get('detail')}"
    except (ValueError, AttributeError):
        return response.text[:200]


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        wanted = float(response.headers.get("retry-after", ""))
    except ValueError:
        wanted = 0.2 * 2**attempt
    return min(max(wanted, 0.05), _MAX_RETRY_AFTER_S)


class _Sender:
    """Posts requests (one part, or a batch of one camera's parts) with retries."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        endpoint: str,
        key: str,
        run_key: str,
        line_id: str,
        camera_id: str | None,
        retries: int,
    ) -> None:
        self.client, self.endpoint, self.run_key = client, endpoint, run_key
        self.auth = {"Authorization": f"Bearer {key}"}
        self.line_id, self.camera_id, self.retries = line_id, camera_id, retries

    def _request(self, parts: list[StreamPart]) -> dict[str, Any]:
        params = {"line_id": self.line_id, "camera_id": self.camera_id or parts[0].camera}
        # One key per part (a batch's image i is stored under key#i) and run: a retry is
        # answered from the prediction log, never judged twice.
        headers = {**self.auth, "Idempotency-Key": f"{self.run_key}-{parts[0].index}"}
        if len(parts) == 1:
            params["part_id"] = parts[0].part_id
            return {
                "url": self.endpoint,
                "content": parts[0].png,
                "params": params,
                "headers": {**headers, "content-type": "image/png"},
            }
        return {
            "url": self.endpoint + "/batch",
            "files": [("images", (f"{p.part_id}.png", p.png, "image/png")) for p in parts],
            "data": {"part_id": [p.part_id for p in parts]},
            "params": params,
            "headers": {**headers, "Idempotency-Key": f"{self.run_key}-b{parts[0].index}"},
        }

    async def send(self, parts: list[StreamPart]) -> list[Sent]:
        request = self._request(parts)
        base = [Sent(p.index, p.part_id, p.label, p.shifted, status=None) for p in parts]
        error = "not sent"
        status: int | None = None
        for attempt in range(self.retries + 1):
            started = time.perf_counter()
            try:
                r = await self.client.post(**request)
            except httpx.TransportError as exc:  # refused, reset, timed out: worth a retry
                error = f"{type(exc).__name__}: {exc}"[:200]
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            seconds = time.perf_counter() - started
            status = r.status_code
            if status == 200:
                body = r.json()
                answers = body["results"] if len(parts) > 1 else [body]
                return [
                    replace(
                        b,
                        status=status,
                        verdict=a["verdict"],
                        model=f"{a['model_name']}/{a['model_version']}",
                        replayed=bool(a.get("replayed")),
                        attempts=attempt + 1,
                        seconds=seconds,
                    )
                    for b, a in zip(base, answers, strict=True)
                ]
            if status in (401, 403):
                raise StreamError(f"the service refused the API key ({status} {_detail(r)})", invalid=True)
            error = f"{status} {_detail(r)}"
            if status not in (429, 503, 504):
                break
            await asyncio.sleep(_retry_after(r, attempt))
        return [replace(b, status=status, error=error, attempts=attempt + 1) for b in base]


Progress = Callable[[Sent], None]
# The batch route parses at most 16 form fields, one part_id per image.
MAX_BATCH = 16


def _requests(parts: list[StreamPart], batch: int) -> list[list[StreamPart]]:
    """Consecutive parts in requests of at most ``batch``, one camera per request."""
    if batch == 1:
        return [[p] for p in parts]
    out: list[list[StreamPart]] = []
    for first in range(0, len(parts), batch):
        group = parts[first : first + batch]
        for camera in sorted({p.camera for p in group}):
            out.append([p for p in group if p.camera == camera])
    return out


async def send_stream(
    plan: StreamPlan,
    url: str,
    key: str,
    *,
    rate: float | None = None,
    concurrency: int = 8,
    batch: int = 1,
    retries: int = 4,
    line_id: str | None = None,
    camera_id: str | None = None,
    timeout_s: float = 30.0,
    progress: Progress | None = None,
) -> StreamSummary:
    """Send every part of ``plan`` to the service at ``url``; the summary of what came back.

    ``rate`` caps parts per second (None = as fast as the service answers ``concurrency``
    requests at a time). ``batch`` > 1 sends up to that many parts per request to
    ``/v1/inspect/batch`` (one camera per request), which the service judges several times
    faster. Raises :class:`StreamError` when the service cannot be reached at all or refuses
    the key.
    """
    if concurrency < 1 or retries < 0 or (rate is not None and rate <= 0) or not 1 <= batch <= MAX_BATCH:
        raise StreamError(
            f"need concurrency >= 1, retries >= 0, a rate > 0 and a batch of 1..{MAX_BATCH}; "
            f"got concurrency={concurrency} retries={retries} rate={rate} batch={batch}",
            invalid=True,
        )
    endpoint = inspect_url(url)
    summary = StreamSummary(plan, run_key=f"stream-{uuid.uuid4().hex[:12]}")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await _check_reachable(client, endpoint)
        sender = _Sender(client, endpoint, key, summary.run_key, line_id or plan.line, camera_id, retries)
        queue: asyncio.Queue[list[StreamPart] | None] = asyncio.Queue(maxsize=4 * concurrency)
        started = time.perf_counter()
        chunk = batch * max(1, _RENDER_CHUNK // batch)  # whole batches per render hop

        async def produce() -> None:
            pre, post = plan.conditions(shifted=False), plan.conditions(shifted=True)
            for first in range(0, plan.n, chunk):
                ks = range(first, min(first + chunk, plan.n))
                # Rendering is numpy work: off the event loop so sending goes on meanwhile.
                parts = await asyncio.to_thread(_render, plan, ks, pre, post)
                for request in _requests(parts, batch):
                    await queue.put(request)
            for _ in range(concurrency):
                await queue.put(None)

        async def consume() -> None:
            while (request := await queue.get()) is not None:
                if rate is not None:  # part k leaves no earlier than k / rate seconds in
                    delay = started + request[0].index / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                for result in await sender.send(request):
                    summary.results.append(result)
                    if progress is not None:
                        progress(result)

        tasks = [asyncio.create_task(produce())]
        tasks += [asyncio.create_task(consume()) for _ in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        summary.seconds = time.perf_counter() - started
    summary.results.sort(key=lambda r: r.index)
    return summary


def _render(plan: StreamPlan, ks: range, pre: LineConditions, post: LineConditions) -> list[StreamPart]:
    return [render_part(plan, k, pre, post) for k in ks]


async def _check_reachable(client: httpx.AsyncClient, endpoint: str) -> None:
    """Fail fast, with the address, when nothing answers there (rather than N timeouts)."""
    base = endpoint.removesuffix("/v1/inspect")
    try:
        await client.get(f"{base}/v2/health/live", timeout=10.0)
    except httpx.TransportError as exc:
        raise StreamError(
            f"cannot reach the service at {base} ({type(exc).__name__}: {exc}); "
            "is `kensa serve` running there?"
        ) from None


def run_stream(plan: StreamPlan, url: str, key: str, **kwargs: Any) -> StreamSummary:
    """Blocking :func:`send_stream`, for the CLI and tests."""
    return asyncio.run(send_stream(plan, url, key, **kwargs))
