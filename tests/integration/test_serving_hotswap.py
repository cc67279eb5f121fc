"""Hot swap under load: the champion moves (once to a corrupt model) while parts keep coming.

A real ``kensa serve`` follows the ``champion`` alias of a model registered in MLflow (SQLite
tracking store), polling every 0.5 s; the test also calls ``POST /admin/reload`` after each move,
as a deployment pipeline would. At least 50 requests/s for at least 20 s; no request may fail,
every answer must come from a version that was champion (and verified) while it was in flight,
and the corrupt version must never answer.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serving_helpers import Server, build_contract_model, make_keys, register, set_champion, solid
from sqlalchemy import select

from kensa.store.audit import verify_chain
from kensa.store.engine import make_engine, make_session_factory
from kensa.store.models import Alert, AuditEvent, Prediction

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "qc-hotswap"
RATE = 60.0  # requests per second offered
DURATION = 22.0  # seconds of load


@dataclass
class Sample:
    sent: float
    received: float
    status: int
    version: str | None
    request_id: str | None


@dataclass
class Move:
    version: str
    moved: float  # alias set
    done: float  # reload answered: swapped (or refused) by then
    status: int


async def _load(base: str, key: str, images: list[bytes], stop_at: float) -> list[Sample]:
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def one(image: bytes) -> None:
            sent = time.monotonic()
            try:
                r = await client.post(
                    "/v1/inspect",
                    content=image,
                    headers={"Authorization": f"Bearer {key}", "content-type": "image/png"},
                )
                body = r.json() if r.status_code == 200 else {}
                samples.append(
                    Sample(
                        sent,
                        time.monotonic(),
                        r.status_code,
                        body.get("model_version"),
                        body.get("request_id"),
                    )
                )
            except httpx.HTTPError as exc:
                samples.append(Sample(sent, time.monotonic(), -1, repr(exc), None))

        tasks = []
        start = time.monotonic()
        for i in itertools.count():
            due = start + i / RATE
            if due >= stop_at:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(images[i % len(images)])))
        await asyncio.gather(*tasks)
    return samples


async def _move(base: str, admin_key: str, uri: str, version: str) -> Move:
    moved = time.monotonic()
    await asyncio.to_thread(set_champion, uri, NAME, version)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        r = await client.post("/admin/reload", headers={"Authorization": f"Bearer {admin_key}"})
    return Move(version, moved, time.monotonic(), r.status_code)


async def _scenario(
    server: Server,
    keys: dict[str, str],
    uri: str,
    plan: list[tuple[float, str]],
    images: list[bytes],
) -> tuple[list[Sample], list[Move], float, float]:
    start = time.monotonic()
    load = asyncio.create_task(_load(server.base, keys["line"], images, start + DURATION))
    moves = []
    for at, version in plan:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        moves.append(await _move(server.base, keys["admin"], uri, version))
    samples = await load
    return samples, moves, start, time.monotonic()


def test_champion_moves_under_load_without_a_failed_request(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = f"sqlite:///{tmp_path / 'kensa.db'}"
    good = [build_contract_model(tmp_path / f"good{i}.onnx", variant=i) for i in range(3)]
    corrupt = build_contract_model(tmp_path / "corrupt.onnx", variant=9, lie_about_parity=True)
    v1, v2 = register(uri, NAME, good[0]), register(uri, NAME, good[1])
    bad = register(uri, NAME, corrupt)  # its hash is right; its parity sample is a lie
    v4 = register(uri, NAME, good[2])
    set_champion(uri, NAME, v1)
    keys = make_keys(store)
    server = Server(
        tmp_path,
        store,
        mlflow_uri=uri,
        env={"KENSA_REGISTRY_NAME": NAME, "KENSA_CHAMPION_POLL_S": "0.5", "KENSA_SAMPLE_RATE": "0"},
    )
    server.start()
    images = [solid(g, noise_seed=i) for i, g in enumerate([255, 0, 128, 230, 30] * 4)]
    plan = [(4.0, v2), (9.0, bad), (13.0, v4), (18.0, v2)]  # four moves, one to the corrupt model
    try:
        samples, moves, start, end = asyncio.run(_scenario(server, keys, uri, plan, images))
    finally:
        assert server.stop() in (0, -15)
    log = server.log()
    assert "Traceback" not in log, log[-4000:]

    # Load: at least 50 requests/s for at least 20 s, and not one failed.
    span = max(s.received for s in samples) - min(s.sent for s in samples)
    assert span >= 20.0 and len(samples) / span >= 50.0, (len(samples), span)
    failed = [s for s in samples if s.status != 200]
    assert not failed, failed[:5]

    # The registry side: the corrupt move was refused, every good one was taken.
    assert [(m.version, m.status) for m in moves] == [(v2, 200), (bad, 409), (v4, 200), (v2, 200)]

    # Each answer's version was the verified champion at some moment while it was in flight:
    # version k may answer from its alias move until the next good swap is confirmed done.
    windows: list[tuple[str, float, float]] = []
    current, since = v1, start - 60.0
    for move in moves:
        if move.status != 200:
            continue  # refused: the previous version keeps serving
        windows.append((current, since, move.done))
        current, since = move.version, move.moved
    windows.append((current, since, float("inf")))
    misjudged = [
        s
        for s in samples
        if not any(v == s.version and lo <= s.received and s.sent <= hi for v, lo, hi in windows)
    ]
    assert not misjudged, [(s.version, s.sent - start, s.received - start) for s in misjudged[:5]]
    served = {s.version for s in samples}
    assert bad not in served and served == {v1, v2, v4}

    # Every 2xx has its row, naming the same version; the refusal left an alert and audit events.
    engine = make_engine(store)
    with make_session_factory(engine)() as session:
        rows = dict(session.execute(select(Prediction.request_id, Prediction.model_version)).all())
        alerts = session.scalars(select(Alert).where(Alert.kind == "model")).all()
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert verify_chain(session) == []
    engine.dispose()
    assert all(rows.get(s.request_id) == s.version for s in samples)
    assert len(alerts) == 1 and f"version {bad} refused at parity" in alerts[0].cause
    assert alerts[0].level == "critical" and alerts[0].status == "open"
    refusals = [e for e in events if e.action == "model.refuse"]
    assert [e.subject for e in refusals] == [f"model:{NAME}/{bad}"]
    swaps = [e.subject.rsplit("/", 1)[1] for e in events if e.action == "model.serve"]
    assert swaps == [v1, v2, v4, v2]
