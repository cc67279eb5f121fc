"""Training throughput per model size on this machine, and ONNX Runtime vs PyTorch eager inference.

    .venv/bin/python -m bench.training [--image-size 128] [--sizes mobilenet_v3_small,resnet18]

Prints a markdown table; figures go to docs/benchmarks.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kensa.models.nets.zoo import build_model, count_parameters, model_names
from kensa.models.onnx.export import ExportGraph, export_onnx_file, working_providers
from kensa.models.train.speed import measure_train_speed


def infer_throughput_torch(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    graph = ExportGraph(model, torch.zeros(model.embedding_dim), torch.zeros(8, model.embedding_dim))
    graph.eval()
    with torch.no_grad():
        graph(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            graph(x)
    return repeats * len(x) / (time.perf_counter() - t0)


def infer_throughput_ort(path: Path, x: np.ndarray, repeats: int, provider: str) -> float:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=[provider])
    sess.run(None, {"images": x})
    t0 = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, {"images": x})
    return repeats * len(x) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", default=",".join(model_names()))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    size, batch = args.image_size, args.batch
    providers = working_providers()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"providers {providers}; {size} px, batch {batch}"
    )
    print("| model | params | train img/s | PyTorch eager infer img/s | ORT CPU infer img/s | ORT / eager |")
    print("|---|---|---|---|---|---|")
    x_t = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes.split(","):
            model = build_model(name, 6).eval()
            train_rate = measure_train_speed(
                name, size, 6, "all", batch_size=batch, steps=3
            ).step_images_per_second
            eager = infer_throughput_torch(model, x_t, args.repeats)
            path = export_onnx_file(
                model,
                size,
                Path(tmp) / f"{name}.onnx",
                {},
                (torch.zeros(model.embedding_dim), torch.zeros(8, model.embedding_dim)),
            )
            onnx_rate = infer_throughput_ort(path, x_t.numpy(), args.repeats, "CPUExecutionProvider")
            print(
                f"| {name} | {count_parameters(model) / 1e6:.1f}M | {train_rate:.0f} | "
                f"{eager:.0f} | {onnx_rate:.0f} | {onnx_rate / eager:.2f}× |",
                flush=True,
            )


if __name__ == "__main__":
    main()
