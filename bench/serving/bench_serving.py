"""Serving throughput and latency: kensa over HTTP vs the in-process limit vs a naive endpoint.

For each model (untrained weights: speed does not depend on them) and each part size, one run
measures, on 127.0.0.1 with N concurrent clients:

* in-process limit: decode + resize (thread pool) + onnxruntime, no HTTP: the best over batch
  sizes and over three ways of running onnxruntime (its defaults; serving's threads; serving's
  threads with two runs at once);
* kensa: ``kensa serve --model`` (auth, micro-batching, prediction log on SQLite);
* naive: a FastAPI endpoint doing one decode and one ``session.run`` per request;
* LitServe with its dynamic batching (same batch size and wait as kensa), when installed.

The ``null`` model costs nothing to run, so its row is the ceiling of each server on this
machine: what HTTP, decoding and (for kensa) statistics and the prediction log cost alone.

Figures are printed as images/s, p50/p99 latency, and ratios to the in-process limit. The load
generator runs on the same machine; it is ``wrk`` (C, Debian package ``wrk``) when present, so the
clients take as little of the two cores as possible, else an httpx client in this process.

    .venv/bin/python bench/serving/bench_serving.py --models mobilenet_v3_small resnet18 \
        --sizes 224 1024 --seconds 10 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

INPUT_SIZE = 224
# Not a zoo model: one whose inference costs nothing, to measure serving's own ceiling.
NULL_MODEL = "null"


def build_model(arch: str, out: Path) -> Path:
    """Export an untrained zoo model with kensa metadata (parity sample from onnxruntime)."""
    import onnx
    import onnxruntime as ort
    import torch

    from models.export import export_onnx_file, parity_sample_images
    from models.zoo import build_model as zoo_model

    classes = ["ok", "defect_scratch", "defect_dent"]
    if arch == NULL_MODEL:
        # Costs nothing to run (a global mean and a 3 x 3 linear layer), so what serving it
        # costs is what serving itself costs: HTTP, decoding, statistics and the log.
        net = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, len(classes))
        ).eval()
        k = d = len(classes)
    else:
        net = zoo_model(arch, len(classes)).eval()
        k = 8
        with torch.no_grad():
            d = net.embed(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)).shape[1]
    pca = (torch.zeros(d), torch.eye(k, d))
    meta = {
        "classes": classes,
        "input_size": INPUT_SIZE,
        "model_name": arch,
        "feature_dims": k,
        "thresholds": {"t_ok": 0.3, "t_defect": 0.7},
    }
    export_onnx_file(net, INPUT_SIZE, out, meta, pca)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs = sess.run(["probs"], {"images": parity_sample_images(INPUT_SIZE)})[0]
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key = "parity_sample"
    entry.value = json.dumps(
        {"seed": 1234, "n": 4, "probs": np.round(probs, 6).tolist(), "atol": 1e-3}
    )
    onnx.save(proto, str(out))
    return out


def make_parts(size: int, n: int = 32) -> list[bytes]:
    """JPEG parts: a smooth grey plate with a few darker marks, quality 90."""
    rng = np.random.default_rng(size)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        plate = 150 + 40 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy)
        img = np.repeat(plate[..., None], 3, axis=2) + rng.normal(0, 6, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def in_process_limit(model: Path, parts: list[bytes], seconds: float) -> dict[str, float]:
    """The best in-process throughput found: decode + resize in a 2-thread pool overlapped with
    onnxruntime, over batch sizes and three ways of running onnxruntime:

    * ``default``: onnxruntime's own session options (one thread per core, spinning), one run at a time;
    * ``serving``: serving's options (``cpu_threads()``, no spinning), one run at a time;
    * ``serving x2``: serving's options, two runs at once (what serving does for a heavy model).
    """
    import onnxruntime as ort

    from serving.engine import cpu_threads

    pool = ThreadPoolExecutor(2)
    best: dict[str, Any] = {"images_per_s": 0.0}
    tuned = ort.SessionOptions()
    tuned.intra_op_num_threads = cpu_threads()
    tuned.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, opts, runners in (
        ("default", ort.SessionOptions(), 1),
        ("serving", tuned, 1),
        ("serving x2", tuned, 2),
    ):
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        for batch in (1, 4, 8, 16, 32):
            rate = _rate(sess, pool, parts, batch, runners, seconds / 5)
            if rate > best["images_per_s"]:
                best = {"images_per_s": rate, "batch": batch, "how": name}
    pool.shutdown(wait=False, cancel_futures=True)
    return best


def _rate(
    sess: Any, pool: ThreadPoolExecutor, parts: list[bytes], batch: int, runners: int, seconds: float
) -> float:
    """Images/s with ``runners`` threads each stacking decoded batches and running them."""
    import itertools
    import threading

    from serving.decode import decode_image

    def decode(i: int) -> np.ndarray:
        return decode_image(parts[i % len(parts)], INPUT_SIZE, 10**9).pixels

    sess.run(["probs", "features"], {"images": np.zeros((batch, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)})
    counter = itertools.count()
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def next_decodes(n: int) -> list[Any]:
        with lock:
            return [pool.submit(decode, next(counter)) for _ in range(n)]

    def runner() -> int:
        # Keep two batches of decodes in flight so decoding overlaps inference.
        ahead = next_decodes(2 * batch)
        done = 0
        while time.perf_counter() < end:
            images = np.stack([f.result() for f in ahead[:batch]])
            ahead = ahead[batch:] + next_decodes(batch)
            sess.run(["probs", "features"], {"images": images})
            done += batch
        for f in ahead:
            f.result()
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(runners) as threads:
        total = sum(threads.map(lambda _: runner(), range(runners)))
    return total / (time.perf_counter() - start)


NAIVE_APP = textwrap.dedent("""
    import io, sys, numpy as np, onnxruntime as ort, uvicorn
    from fastapi import FastAPI, Request
    from PIL import Image
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    app = FastAPI()

    def judge(data: bytes) -> list:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img = img.resize((224, 224), Image.Resampling.BILINEAR)
        return sess.run(["probs"], {"images": np.asarray(img)[None]})[0][0].tolist()

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        from starlette.concurrency import run_in_threadpool
        return {"probs": await run_in_threadpool(judge, await request.body())}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
""")


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


LITSERVE_APP = textwrap.dedent("""
    import io, sys, numpy as np, onnxruntime as ort, litserve as ls
    from PIL import Image

    class Judge(ls.LitAPI):
        def setup(self, device):
            self.sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])

        def decode_request(self, request):
            img = Image.open(io.BytesIO(request["image"].file.read()))
            img.draft("RGB", (224, 224))
            return np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))

        def batch(self, inputs):
            return np.stack(inputs)

        def predict(self, images):
            return self.sess.run(["probs"], {"images": images})[0]

        def unbatch(self, output):
            return list(output)

        def encode_response(self, probs):
            return {"probs": probs.tolist()}

    if __name__ == "__main__":
        api = Judge(max_batch_size=int(sys.argv[3]), batch_timeout=float(sys.argv[4]))
        server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
        server.run(port=int(sys.argv[2]), generate_client_file=False, log_level="warning")
""")


def multipart(parts: list[bytes], field: str = "image") -> tuple[list[bytes], str]:
    """The same JPEG parts as multipart/form-data bodies (what LitServe's form parsing takes)."""
    boundary = "kensa-bench-boundary"
    bodies = [
        (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"part.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + part
        + f"\r\n--{boundary}--\r\n".encode()
        for part in parts
    ]
    return bodies, f"multipart/form-data; boundary={boundary}"


def bench_litserve(model: Path, parts: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    from serving_helpers import free_port

    from kensa.settings import Settings

    settings = Settings()
    port = free_port()
    script = Path(tempfile.mkdtemp()) / "litserve_app.py"
    script.write_text(LITSERVE_APP)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(model), str(port), str(settings.max_batch_size),
         str(settings.max_wait_ms / 1000)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # LitServe spawns workers: stop the whole group afterwards
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        bodies, content_type = multipart(parts)
        url = f"http://127.0.0.1:{port}/predict"
        headers = {"content-type": content_type}
        drive(url, bodies, headers, clients, 2)
        return drive(url, bodies, headers, clients, seconds)
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM a process group and wait until every process in it is gone (SIGKILL at timeout).

    LitServe's workers outlive its main process for a while; left running, they took half the
    CPU from the next measurement (the in-process limit of the next model came out halved).
    """
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout)
    deadline, killed = time.monotonic() + timeout, False
    while True:
        try:
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            if killed:
                return  # only unreaped zombies can be left; they use no CPU
            os.killpg(proc.pid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 5, True
        time.sleep(0.1)


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


def bench_kensa(
    model: Path, parts: list[bytes], clients: int, seconds: float, tmp: Path
) -> dict[str, float]:
    from serving_helpers import free_port, make_keys

    store = f"sqlite:///{tmp / 'kensa.db'}"
    key = make_keys(store, ["line"])["line"]
    port = free_port()
    env = {
        **os.environ,
        "KENSA_DATA_DIR": str(tmp),
        "KENSA_STORE_URL": store,
        "KENSA_PORT": str(port),
        "KENSA_LOG_LEVEL": "WARNING",
        "KENSA_DRAIN_S": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kensa.cli.serve", "--model", str(model)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/live", proc)
        headers = {"Authorization": f"Bearer {key}", "content-type": "image/jpeg"}
        url = f"http://127.0.0.1:{port}/v1/inspect"
        drive(url, parts, headers, clients, 2)  # warm-up
        return drive(url, parts, headers, clients, seconds)
    finally:
        proc.terminate()
        proc.wait(30)


def bench_naive(model: Path, parts: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    from serving_helpers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", NAIVE_APP, str(model), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/docs", proc)
        url = f"http://127.0.0.1:{port}/predict"
        headers = {"content-type": "image/jpeg"}
        drive(url, parts, headers, clients, 2)
        return drive(url, parts, headers, clients, seconds)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["mobilenet_v3_small", "resnet18", NULL_MODEL],
        help=f"zoo architectures, and '{NULL_MODEL}': a model that costs nothing to run",
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 1024])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--no-litserve", action="store_true", help="Skip the LitServe comparison.")
    args = parser.parse_args()
    try:
        import litserve  # noqa: F401

        has_litserve = not args.no_litserve
    except ImportError:
        has_litserve = False
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.clients} clients on 127.0.0.1 ({'wrk' if WRK else 'httpx'}), {args.seconds:g} s per run, "
        "CPU onnxruntime"
    )
    if not has_litserve:
        print("LitServe: skipped (not installed or --no-litserve)")
    print("| model | part | limit img/s (how, batch) | kensa img/s | ratio | p50 / p99 ms "
          "| naive img/s | ratio | p50 / p99 ms | LitServe img/s | ratio | p50 / p99 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for arch in args.models:
            model = build_model(arch, tmp / f"{arch}.onnx")
            for size in args.sizes:
                parts = make_parts(size)
                limit = in_process_limit(model, parts, args.seconds)
                run_dir = tmp / f"{arch}-{size}"
                run_dir.mkdir()
                results = [
                    bench_kensa(model, parts, args.clients, args.seconds, run_dir),
                    bench_naive(model, parts, args.clients, args.seconds),
                ]
                if has_litserve:
                    results.append(bench_litserve(model, parts, args.clients, args.seconds))
                lim = limit["images_per_s"]
                cells = [arch, str(size), f"{lim:.0f} ({limit['how']}, {limit['batch']})"]
                for r in results:
                    errors = f", {r['errors']:.0f} errors" if r["errors"] else ""
                    cells += [
                        f"{r['images_per_s']:.0f}",
                        f"{r['images_per_s'] / lim:.2f}×",
                        f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}{errors}",
                    ]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
