"""Served cost of PatchCore's bank recipes, measured side by side in one run at 256 px.

    .venv/bin/python -m bench.patchcore_speed

Speed depends on the shapes (patches × bank × dimensions), not on what the bank learned, so each
recipe is fitted on 60 good parts of the synthetic line, exported like a served model (probs,
features, score and anomaly map) and timed under onnxruntime's defaults at batch 16 for a few
seconds. Prints images/s per recipe and the ratio to the first (the first release's raw bank).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kensa.models.line.synthetic import LineConditions, iter_parts
from kensa.models.nets.patchcore import PatchCoreConfig, fit_patchcore
from kensa.models.onnx.anomaly import OUTPUTS
from kensa.models.onnx.export import write_onnx

RECIPES = ((4096, None), (12_000, 64), (8192, 64))  # (bank, projected dims; None: raw taps)


def images_per_second(path: Path, images: np.ndarray, seconds: float = 6.0) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess.run(None, {"images": images})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {"images": images})
        n += len(images)
    return n / (time.perf_counter() - t0)


def main() -> None:
    good = [img for img, rec in iter_parts(90, 3, LineConditions(), 256) if rec.label == "ok"][:60]
    images = torch.from_numpy(np.stack(good))
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for bank, dims in RECIPES:
            fit = fit_patchcore(images, PatchCoreConfig(bank_size=bank, reduce_dim=dims))
            out = Path(tmp) / f"pc-{bank}-{dims}.onnx"
            write_onnx(fit.net, 256, out, {"kind": "anomaly"}, OUTPUTS)
            rate = images_per_second(out, images[:16].numpy())
            first = first or rate
            what = f"{bank:,} × {dims or fit.net.bank.shape[1]}-d {'PCA' if dims else 'raw'}"
            print(f"{what}: {rate:.1f} img/s ({rate / first:.2f}× the raw bank)", flush=True)


if __name__ == "__main__":
    main()
