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

The models, the parts and the in-process limit are in ``inprocess.py``; load generation (wrk or
httpx) is in ``loadgen.py``; this script starts each server and prints the table.

Figures are printed as images/s, p50/p99 latency, and ratios to the in-process limit. The load
generator runs on the same machine; it is ``wrk`` (C, Debian package ``wrk``) when present, so the
clients take as little of the two cores as possible, else an httpx client in this process.

    .venv/bin/python bench/serving/bench_serving.py --models mobilenet_v3_small resnet18 \
        --sizes 224 1024 --seconds 10 --clients 16

``--onnx FILE ...`` serves exported kensa models instead (a fitted PatchCore, say: its memory bank,
not its weights, sets its speed), each at the sizes given:

    .venv/bin/python bench/serving/bench_serving.py --onnx run/model.onnx --sizes 256 --no-litserve
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# The bench's own modules (this folder is on sys.path when the script runs).
from inprocess import NULL_MODEL, build_model, in_process_limit, make_parts  # noqa: E402
from loadgen import WRK, drive, multipart, wait_ready  # noqa: E402

NAIVE_APP = textwrap.dedent("""
    import io, sys, numpy as np, onnxruntime as ort, uvicorn
    from fastapi import FastAPI, Request
    from PIL import Image
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    side = sess.get_inputs()[0].shape[1]
    size = side if isinstance(side, int) else 224
    outputs = [o.name for o in sess.get_outputs()]  # what kensa computes too (maps for a region)
    app = FastAPI()

    def judge(data: bytes) -> list:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        return sess.run(outputs, {"images": np.asarray(img)[None]})[0][0].tolist()

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        from starlette.concurrency import run_in_threadpool
        return {"probs": await run_in_threadpool(judge, await request.body())}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
""")


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
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)  # if it hangs, the loop below kills what is left
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


def bench_kensa(model: Path, parts: list[bytes], clients: int, seconds: float, tmp: Path) -> dict[str, float]:
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
    parser.add_argument("--onnx", nargs="+", type=Path, default=[], help="kensa ONNX files to serve instead")
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
        if args.onnx:
            from kensa.models.onnx.contract import read_metadata

            models = [(f"{read_metadata(p).get('model_name', p.stem)} ({p.name})", p) for p in args.onnx]
        else:
            models = [(arch, build_model(arch, tmp / f"{arch}.onnx")) for arch in args.models]
        for arch, model in models:
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
