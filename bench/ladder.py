"""The fine-tuning ladder measured on one synthetic line: quality against CPU cost, rung by rung.

    .venv/bin/python -m bench.ladder --sizes 128,256 --n 2000,3000 --seed 7 [--rungs ...] [--out DIR]

``--n`` is the number of parts per size (one value for all sizes, or one per size). Each measured
row is appended to ``--log`` (``docs/data/ladder.jsonl``, kept in git beside the table it feeds) as
it lands, and a row already there (same rung, size,
parts and seed) is not measured again: a long run can be continued, a size added later, and the
table and plot are drawn from every row on file.

Each rung (a zoo model and a ``finetune`` value, or a from-scratch model) trains on the same
dataset version and is judged the way the KPI gate judges it: defect-vs-good AUROC and clean
error on the test split, automation with the review band certified at 90 % for escape <= 5 % and
<= 2 % (false reject <= 5 %), and the escape rate under the corruption suite (severities <= 3).
Train CPU-seconds are the process's user + system time around training (feature extraction
included); inference is the exported ONNX model under onnxruntime on this machine's CPU.

The line uses a seed nobody tuned on (7; the recipes were tuned on seed 0). Prints one markdown
table per size and writes a plot of automation against train CPU-seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from matplotlib.figure import Figure

from kensa.models.data.ingest import ingest_dataset
from kensa.models.evaluation.evaluate_run import BandPolicy, evaluate_run
from kensa.models.line.synthetic import LineConditions, generate_dataset
from kensa.models.onnx.export import export_run
from kensa.models.train.trainer import TrainConfig, train
from kensa.settings import Settings


@dataclass(frozen=True)
class Rung:
    label: str
    model: str
    finetune: str
    epochs: int


RUNGS = {
    "small_cnn": Rung("small_cnn, from scratch", "small_cnn", "all", 15),
    "mobilenet_v2-head": Rung("mobilenet_v2, frozen maps + head", "mobilenet_v2", "head", 30),
    "lite0-head": Rung("efficientnet_lite0, frozen maps + head", "efficientnet_lite0", "head", 30),
    "lite0-last": Rung("efficientnet_lite0, last stages + head", "efficientnet_lite0", "last", 8),
    "lite0-all": Rung("efficientnet_lite0, full fine-tuning", "efficientnet_lite0", "all", 4),
}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def onnx_images_per_second(path: Path, size: int, batch: int = 16, seconds: float = 3.0) -> float:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    sess.run(None, {"images": x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {"images": x})
        n += batch
    return n / (time.perf_counter() - t0)


def measure(key: str, data: Path, size: int, out: Path, seed: int) -> dict[str, Any]:
    rung = RUNGS[key]
    run_dir = out / f"{rung.model}-{rung.finetune}-{size}-{data.name}"
    config = TrainConfig(
        model=rung.model, finetune=rung.finetune, epochs=rung.epochs, image_size=size, seed=seed
    )
    c0, t0 = cpu_seconds(), time.perf_counter()
    result = train(data, config, run_dir, show_progress=True)
    train_cpu, train_wall = cpu_seconds() - c0, time.perf_counter() - t0
    strict = evaluate_run(
        run_dir, policy=BandPolicy(alpha=0.02, delta=0.1, max_false_reject=0.05), show_progress=False
    )
    # The 5 % band last: export reads band.json, and the 5 % band is the KPI gate's default.
    m = evaluate_run(
        run_dir,
        corruptions=True,
        policy=BandPolicy(alpha=0.05, delta=0.1, max_false_reject=0.05),
        max_robustness_images=192,
        show_progress=False,
    )
    onnx = export_run(run_dir, run_dir / "model.onnx").path
    rob = m.get("robustness", {})
    return {
        "key": key,
        "rung": rung.label,
        "size": size,
        "params": result.parameters,
        "error": m["error"],
        "auroc": m["defect_auroc"],
        "auto5": m["band"]["automation_rate"] if m["band"]["guaranteed"] else 0.0,
        "certified5": m["band"]["guaranteed"],
        "test_auto5": m["automation_rate"],
        "test_escape5": m["escape_rate"],
        "test_fr5": m["false_reject_rate"],
        "auto2": strict["band"]["automation_rate"] if strict["band"]["guaranteed"] else 0.0,
        "certified2": strict["band"]["guaranteed"],
        "test_escape2": strict["escape_rate"],
        "corrupted_escape": rob.get("corrupted_escape_rate"),
        "train_cpu_s": train_cpu,
        "train_wall_s": train_wall,
        "train_img_s": result.images_per_second,
        "onnx_img_s": onnx_images_per_second(onnx, size),
    }


def bench_line(out: Path, size: int, n: int, seed: int) -> Path:
    """The benchmark's line ``out/line-<size>-<seed>-<n>``, generated and ingested once."""
    data = out / f"line-{size}-{seed}-{n}"
    if not (data / ".kensa-dataset.json").exists():
        generate_dataset(data, n=n, seed=seed, image_size=size, conditions=LineConditions())
        ingest_dataset(data, Settings(data_dir=out / "home"))
    return data


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| rung | px | parts | params | clean error | AUROC | automation, escape ≤ 5 % (test esc / FR) "
        "| automation, escape ≤ 2 % (test esc) | corrupted escape | train CPU-s | train img/s "
        "| ONNX img/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        auto5 = _pct(r["auto5"]) + ("" if r["certified5"] else " (not certified)")
        auto2 = _pct(r["auto2"]) + ("" if r["certified2"] else " (not certified)")
        lines.append(
            f"| {r['rung']} | {r['size']} | {r.get('n', '')} | {r['params'] / 1e6:.2f}M | {_pct(r['error'])} "
            f"| {r['auroc']:.3f} | {auto5} ({_pct(r['test_escape5'])} / {_pct(r['test_fr5'])}) "
            f"| {auto2} ({_pct(r['test_escape2'])}) | {_pct(r['corrupted_escape'])} "
            f"| {r['train_cpu_s']:.0f} | {r['train_img_s']:.0f} | {r['onnx_img_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for size, marker in zip(sorted({r["size"] for r in rows}), "os^", strict=False):
        sel = [r for r in rows if r["size"] == size]
        ax.scatter([r["train_cpu_s"] for r in sel], [100 * r["auto5"] for r in sel], marker=marker, s=60,
                   label=f"{size} px, escape ≤ 5 %")  # fmt: skip
        ax.scatter([r["train_cpu_s"] for r in sel], [100 * r["auto2"] for r in sel], marker=marker, s=60,
                   facecolors="none", edgecolors="C3", label=f"{size} px, escape ≤ 2 %")  # fmt: skip
        for r in sel:
            ax.annotate(r["key"], (r["train_cpu_s"], 100 * r["auto5"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("train CPU-seconds (log)")
    ax.set_ylabel("automation, band certified at 90 % (%)")
    ax.set_ylim(-2, 102)
    ax.axhline(85, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Fine-tuning ladder on the synthetic line: what each CPU-second buys")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--n", default="2000", help="parts per size: one value, or one per size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rungs", default=",".join(RUNGS))
    parser.add_argument("--out", type=Path, default=Path(".kensa/bench/ladder"))
    parser.add_argument("--log", type=Path, default=Path("docs/data/ladder.jsonl"))
    parser.add_argument("--plot", type=Path, default=Path("docs/images/ladder.png"))
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; line seed {args.seed}, {args.n} parts"
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.n.split(",")]
    if len(counts) not in (1, len(sizes)):
        parser.error(f"--n needs one value or one per size ({len(sizes)}); got {args.n}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.log
    log.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for size, n in zip(sizes, counts * len(sizes) if len(counts) == 1 else counts, strict=False):
        data = bench_line(args.out, size, n, args.seed)
        for key in args.rungs.split(","):
            if any(
                (r["key"], r["size"], r.get("n"), r.get("seed")) == (key, size, n, args.seed) for r in rows
            ):
                continue
            row = {**measure(key, data, size, args.out, seed=0), "n": n, "seed": args.seed}
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
        print(table([r for r in rows if r["size"] == size]), flush=True)
    plot(rows, args.plot)
    print(table(rows))


if __name__ == "__main__":
    main()
