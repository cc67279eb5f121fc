"""Load generation for the serving bench: wrk when installed, else an httpx client."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

WRK = shutil.which("wrk")
LUA = Path(__file__).with_name("post_bodies.lua")


def drive_wrk(
    url: str, bodies: list[bytes], headers: dict[str, str], clients: int, seconds: float
) -> dict[str, float]:
    """Load ``url`` with wrk: ``clients`` connections over 2 threads, bodies rotated."""
    assert WRK is not None
    with tempfile.TemporaryDirectory() as tmp:
        for i, body in enumerate(bodies):
            Path(tmp, f"{i}.body").write_bytes(body)
        cmd = [
            WRK, "-t2", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(LUA), url,
            "--", tmp, str(len(bodies)), headers.get("content-type", "application/octet-stream"),
            headers.get("Authorization", ""),
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    ok = summary["requests"] - summary["non_2xx"]
    return {
        "images_per_s": ok / (summary["duration_us"] / 1e6),
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "errors": summary["non_2xx"] + summary["socket_errors"],
    }


def drive(
    url: str, parts: list[bytes], headers: dict[str, str], clients: int, seconds: float
) -> dict[str, float]:
    if WRK:
        return drive_wrk(url, parts, headers, clients, seconds)
    return asyncio.run(drive_httpx(url, parts, headers, clients, seconds))


async def drive_httpx(
    url: str, parts: list[bytes], headers: dict[str, str], clients: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def client(i: int) -> None:
            nonlocal errors
            n = i
            while time.perf_counter() < end:
                t = time.perf_counter()
                r = await http.post(url, content=parts[n % len(parts)], headers=headers)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
                n += clients

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [float("nan")] * 99
    return {
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "errors": errors,
    }


def multipart(parts: list[bytes], field: str = "image") -> tuple[list[bytes], str]:
    """The same JPEG parts as multipart/form-data bodies (what LitServe's form parsing takes)."""
    boundary = "kensa-bench-boundary"
    bodies = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="part.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + part
        + f"\r\n--{boundary}--\r\n".encode()
        for part in parts
    ]
    return bodies, f"multipart/form-data; boundary={boundary}"


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not up in {timeout} s")
