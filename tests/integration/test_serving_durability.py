"""Nothing lost, nothing stuck: kill -9 under write load, SIGTERM drain, full queue, deadlines.

Real ``kensa serve`` processes on 127.0.0.1, on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import Server, build_contract_model, make_keys, solid
from sqlalchemy import func, select

from kensa.store.engine import make_engine, make_session_factory
from kensa.store.models import Prediction, ReviewItem

pytestmark = pytest.mark.integration


def _request_ids(store_url: str) -> set[str]:
    engine = make_engine(store_url)
    try:
        with make_session_factory(engine)() as session:
            return set(session.scalars(select(Prediction.request_id)).all())
    finally:
        engine.dispose()


async def _write_load(
    base: str, key: str, seconds_before_kill: float, server: Server
) -> tuple[list[str], int]:
    """16 clients posting parts; kill -9 the server mid-stream. 2xx request ids, failures."""
    ok: list[str] = []
    failures = 0
    stop = asyncio.Event()
    images = [solid(g, noise_seed=i) for i, g in enumerate([255, 0, 128, 200] * 4)]

    async def client(i: int) -> None:
        nonlocal failures
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = await http.post(
                        "/v1/inspect",
                        content=images[(i + n) % len(images)],
                        headers={"Authorization": f"Bearer {key}", "content-type": "image/png"},
                    )
                except httpx.HTTPError:
                    failures += 1
                    await asyncio.sleep(0.05)
                    continue
                if r.status_code == 200:
                    ok.append(r.json()["request_id"])

    tasks = [asyncio.create_task(client(i)) for i in range(16)]
    await asyncio.sleep(seconds_before_kill)
    await asyncio.to_thread(server.kill9)  # SIGKILL: no shutdown, no flush, no goodbye
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*tasks)
    return ok, failures


@pytest.fixture(params=["sqlite", pytest.param("postgresql", id="postgresql")])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kensa.db'}"
    url: str = request.getfixturevalue("fresh_pg_url")
    return url


def test_kill_9_during_write_load_then_restart_loses_no_acknowledged_verdict(
    tmp_path: Path, store_url: str
) -> None:
    model = build_contract_model(tmp_path / "m.onnx")
    keys = make_keys(store_url)
    server = Server(tmp_path, store_url, model=model, env={"KENSA_SAMPLE_RATE": "0.5"})
    server.start()
    try:
        acknowledged, _ = asyncio.run(_write_load(server.base, keys["line"], 2.5, server))
    finally:
        server.stop()  # a no-op after the kill; ends the server if the load failed first
    assert len(acknowledged) >= 50, f"only {len(acknowledged)} answers before the kill"
    # Restart on the same store: every answered request has its row, and service resumes.
    restarted = Server(tmp_path, store_url, model=model).start()
    try:
        stored = _request_ids(store_url)
        missing = [rid for rid in acknowledged if rid not in stored]
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged verdicts have no row"
        r = httpx.post(
            f"{restarted.base}/v1/inspect",
            content=solid(255),
            timeout=30,
            headers={"Authorization": f"Bearer {keys['line']}", "content-type": "image/png"},
        )
        assert r.status_code == 200
        engine = make_engine(store_url)
        with make_session_factory(engine)() as session:
            paths = session.scalars(
                select(Prediction.image_path).where(Prediction.image_path.is_not(None))
            ).all()
            reviews = session.scalar(select(func.count()).select_from(ReviewItem))
        engine.dispose()
        assert paths and all(Path(p).is_file() for p in paths)  # images written before their rows
        assert reviews and reviews > 0
    finally:
        restarted.stop()


def test_sigterm_turns_readiness_503_finishes_in_flight_then_exits(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'kensa.db'}"
    keys = make_keys(store, ["line"])
    # A batch waits 1.5 s to fill, so a request is still in flight when SIGTERM arrives.
    server = Server(
        tmp_path,
        store,
        model=build_contract_model(tmp_path / "m.onnx"),
        env={"KENSA_MAX_WAIT_MS": "1500", "KENSA_MAX_BATCH_SIZE": "64", "KENSA_DRAIN_S": "1.0"},
    ).start()
    result: dict[str, httpx.Response] = {}

    def in_flight() -> None:
        result["r"] = httpx.post(
            f"{server.base}/v1/inspect",
            content=solid(0),
            timeout=30,
            headers={"Authorization": f"Bearer {keys['line']}", "content-type": "image/png"},
        )

    try:
        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(f"{server.base}/v2/health/ready", timeout=5)
        assert ready.status_code == 503 and "shutting down" in ready.json()["error"]
        assert httpx.get(f"{server.base}/v2/health/live", timeout=5).status_code == 200
        thread.join(30)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["request_id"] in _request_ids(store)
        assert server.proc is not None and server.proc.wait(15) in (0, -15)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.base}/v2/health/live", timeout=2)
    finally:
        server.stop()


def test_full_queue_answers_503_at_once_and_deadline_504(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'kensa.db'}"
    keys = make_keys(store, ["line"])
    # Room for two images; a batch waits 2 s to fill, longer than the 0.5 s deadline.
    server = Server(
        tmp_path,
        store,
        model=build_contract_model(tmp_path / "m.onnx"),
        env={
            "KENSA_QUEUE_SIZE": "2",
            "KENSA_MAX_WAIT_MS": "2000",
            "KENSA_MAX_BATCH_SIZE": "64",
            "KENSA_REQUEST_TIMEOUT_S": "0.5",
        },
    ).start()
    headers = {"Authorization": f"Bearer {keys['line']}", "content-type": "image/png"}

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
            first = [
                asyncio.create_task(
                    http.post("/v1/inspect", content=solid(255, noise_seed=i), headers=headers)
                )
                for i in range(2)
            ]
            await asyncio.sleep(0.15)
            t0 = time.monotonic()
            overflow = await http.post("/v1/inspect", content=solid(0), headers=headers)
            return list(await asyncio.gather(*first)), overflow, time.monotonic() - t0

    try:
        timed_out, overflow, waited = asyncio.run(scenario())
    finally:
        server.stop()
    assert overflow.status_code == 503 and overflow.headers["retry-after"] == "1"
    assert overflow.json()["error"] == "overloaded" and waited < 0.4  # refused at once, not queued
    assert [r.status_code for r in timed_out] == [504, 504]
    assert timed_out[0].json()["error"] == "deadline_exceeded"
    assert "Idempotency-Key" in timed_out[0].json()["detail"]
    assert _request_ids(store) == set()  # dropped before inference: no verdict, no row
    assert "Traceback" not in server.log()
