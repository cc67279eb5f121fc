"""The bench's models and parts, and the in-process limit every server is measured against."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

INPUT_SIZE = 224
# Not a zoo model: one whose inference costs nothing, to measure serving's own ceiling.
NULL_MODEL = "null"


def build_model(arch: str, out: Path) -> Path:
    """Export an untrained zoo model with kensa metadata (parity sample from onnxruntime)."""
    import onnx
    import onnxruntime as ort
    import torch

    from kensa.models.nets.zoo import build_model as zoo_model
    from kensa.models.onnx.export import export_onnx_file, parity_sample_images

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
    entry.value = json.dumps({"seed": 1234, "n": 4, "probs": np.round(probs, 6).tolist(), "atol": 1e-3})
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

    from kensa.serving.inference.engine import cpu_threads

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

    from kensa.serving.inference.decode import decode_image

    side = sess.get_inputs()[0].shape[1]
    size = side if isinstance(side, int) else INPUT_SIZE
    # Every output the graph has, as serving asks for them (an anomaly model's map gives the region).
    outputs = [o.name for o in sess.get_outputs()]

    def decode(i: int) -> np.ndarray:
        return decode_image(parts[i % len(parts)], size, 10**9).pixels

    sess.run(outputs, {"images": np.zeros((batch, size, size, 3), np.uint8)})
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
            sess.run(outputs, {"images": images})
            done += batch
        for f in ahead:
            f.result()
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(runners) as threads:
        total = sum(threads.map(lambda _: runner(), range(runners)))
    return total / (time.perf_counter() - start)
