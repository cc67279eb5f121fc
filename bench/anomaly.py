"""Learning from good parts only, measured on the ladder's lines: PatchCore beside the supervised rungs.

    .venv/bin/python -m bench.anomaly --sizes 128,256 --n 2000,3000 --seed 7 [--good 300,all]

The same synthetic line (seed 7, which nobody tuned on) and the same dataset versions as
``bench.ladder``. Each row fits PatchCore (``kensa.models.nets.patchcore``) on good parts of the
training split only (``--good``: a count, or ``all``), calibrates the good-parts-only band
(``kensa.models.evaluation.anomaly_band``) on the good parts of the calibration split at false
reject <= 5 % and <= 2 % (certified at 90 %), and judges the test split: image AUROC, pixel AUROC
against the line's defect masks, automation and the measured escape rate (not certified: the fit
saw no defect). Fit seconds are wall time on this machine (feature extraction and coreset); ONNX
img/s is the exported graph under onnxruntime, batch 16. Rows are appended to ``--log`` and a row
already there is not measured again. The plot puts the anomaly rows beside the ladder's
supervised rungs (``docs/data/ladder.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from bench.ladder import bench_line, cpu_seconds, onnx_images_per_second
from kensa.models.data.ingest import load_dataset
from kensa.models.evaluation.anomaly_band import NotEnoughCalibrationError, calibrate_anomaly_band
from kensa.models.evaluation.evaluate_anomaly import record_mask
from kensa.models.evaluation.thresholds import apply_band
from kensa.models.nets.patchcore import PatchCoreConfig, fit_patchcore, score_images
from kensa.models.onnx.anomaly import export_anomaly_model
from kensa.models.train.anomaly import good_images
from kensa.models.train.cpu import configure_cpu_training

RAW_RECIPE = "4,096 raw 176-d patches"  # the rows measured before patches were projected


def recipe_of(config: PatchCoreConfig) -> str:
    """How the bank is built, in words: what makes two rows of the same size comparable or not."""
    dims = f"{config.reduce_dim}-d PCA" if config.reduce_dim else "raw 176-d"
    return f"{config.bank_size:,} {dims} patches"


def measure(data: Path, size: int, good: str, out: Path, seed: int) -> dict[str, Any]:
    ds = load_dataset(data)
    train_good = [r for r in ds.split("train") if r.label == "ok"]
    if good != "all":
        rng = np.random.default_rng(seed)
        train_good = [train_good[i] for i in sorted(rng.choice(len(train_good), int(good), replace=False))]
    calib = [r for r in ds.split("calibration") if r.label == "ok"]
    test = list(ds.split("test"))
    c0, t0 = cpu_seconds(), time.perf_counter()
    config = PatchCoreConfig(seed=seed)
    fit = fit_patchcore(good_images(ds, train_good, size), config, progress=None)
    fit_wall, fit_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    s_cal, _ = score_images(fit.net, good_images(ds, calib, size))
    test_images = good_images(ds, test, size)
    s_test, maps = score_images(fit.net, test_images)
    y = np.array([r.label != "ok" for r in test])
    none = np.zeros((size, size), bool)
    masks = np.stack([m if (m := record_mask(r, size)) is not None else none for r in test])
    row: dict[str, Any] = {
        "key": f"patchcore-{good}",
        "recipe": recipe_of(config),
        "size": size,
        "good_parts": len(train_good),
        "bank": int(fit.net.bank.shape[0]),
        "image_auroc": float(roc_auc_score(y, s_test)),
        # Over every pixel of every test part (good parts: all negative), as anomalib reports it.
        "pixel_auroc": float(roc_auc_score(masks.ravel(), maps.ravel())),
        "fit_wall_s": fit_wall,
        "fit_cpu_s": fit_cpu,
        "n_test_good": int((~y).sum()),
        "n_test_defective": int(y.sum()),
    }
    for fr in (0.05, 0.02):
        tag = f"{int(fr * 100)}"
        try:
            band = calibrate_anomaly_band(s_cal, np.zeros(len(s_cal), bool), max_false_reject=fr, delta=0.1)
        except NotEnoughCalibrationError as exc:  # recorded as such: the band refuses, it does not guess
            row.update({f"auto{tag}": 0.0, f"escape{tag}": None, f"fr{tag}": None, f"certified{tag}": False,
                        f"needs{tag}": exc.need})  # fmt: skip
            continue
        v = apply_band(np.clip(s_test, 0, 1), band.t_ok, band.t_defect)
        row[f"auto{tag}"] = float((v != "review").mean())
        row[f"escape{tag}"] = float((v[y] == "ok").mean())
        row[f"fr{tag}"] = float((v[~y] == "defect").mean())
        row[f"certified{tag}"] = band.false_reject_guaranteed
    band5 = calibrate_anomaly_band(s_cal, np.zeros(len(s_cal), bool), max_false_reject=0.05, delta=0.1)
    onnx = out / onnx_name(row)
    export_anomaly_model(fit.net, size, band5.to_dict(), onnx, test_images[:64].numpy())
    row["onnx_img_s"] = onnx_images_per_second(onnx, size)
    return row


def onnx_name(r: dict[str, Any]) -> str:
    """The exported file of a row, kept in --out for --retime."""
    recipe = r.get("recipe", RAW_RECIPE).split(" patches")[0].replace(",", "").replace(" ", "-")
    return f"{r['key']}-{r['size']}-{recipe}.onnx"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _auto(r: dict[str, Any], tag: str) -> str:
    if not r[f"certified{tag}"]:
        return f"not certified (needs {r.get(f'needs{tag}', '?')} good calibration parts)"
    return f"{_pct(r[f'auto{tag}'])} ({_pct(r[f'escape{tag}'])} / {_pct(r[f'fr{tag}'])})"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | px | good parts fitted | bank | image AUROC | pixel AUROC | automation, FR ≤ 5 % "
        "(test escape / FR) | automation, FR ≤ 2 % (test escape / FR) | fit s (CPU-s) | ONNX img/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| PatchCore, Lite0 taps 4+8+16 | {r['size']} | {r['good_parts']} "
            f"| {r.get('recipe', RAW_RECIPE)} "
            f"| {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} "
            f"| {_auto(r, '5')} | {_auto(r, '2')} "
            f"| {r['fit_wall_s']:.0f} ({r['fit_cpu_s']:.0f}) | {r['onnx_img_s']:.0f} |"
        )
    return "\n".join(lines)


def side_by_side(rows: list[dict[str, Any]], ladder: list[dict[str, Any]]) -> str:
    """Supervised rungs and PatchCore (default recipe) in one table, per size: what each costs and buys.

    Automation is each model's at false reject <= 5 %: the supervised band also certifies escape
    <= 5 %, PatchCore's cannot (it saw no defect), so its measured test escape rate stands beside it.
    """
    recipe = recipe_of(PatchCoreConfig())
    lines = [
        "| model | learned from | px | AUROC | automation (test escape) | escape certified | CPU-s |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in sorted({r["size"] for r in rows + ladder}):
        for r in (r for r in ladder if r["size"] == size):
            lines.append(
                f"| {r['rung']} | labelled parts | {size} | {r['auroc']:.3f} "
                f"| {_pct(r['auto5'])} ({_pct(r['test_escape5'])}) | yes (≤ 5 %) | {r['train_cpu_s']:.0f} |"
            )
        for r in (r for r in rows if r["size"] == size and r.get("recipe") == recipe):
            lines.append(
                f"| PatchCore, {r['good_parts']} good parts | good parts only | {size} "
                f"| {r['image_auroc']:.3f} | {_pct(r['auto5'])} ({_pct(r['escape5'])}) | no "
                f"| {r['fit_cpu_s']:.0f} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], ladder: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for size, marker in zip(sorted({r["size"] for r in ladder + rows}), "os^", strict=False):
        sup = [r for r in ladder if r["size"] == size]
        ax.scatter([r["train_cpu_s"] for r in sup], [r["auroc"] for r in sup], marker=marker, s=50,
                   color="0.6", label=f"{size} px, supervised rungs")  # fmt: skip
        an = [r for r in rows if r["size"] == size]
        for raw, colour, what in ((True, "C1", RAW_RECIPE), (False, "C2", recipe_of(PatchCoreConfig()))):
            pts = [r for r in an if (r.get("recipe", RAW_RECIPE) == RAW_RECIPE) == raw]
            ax.scatter([r["fit_cpu_s"] for r in pts], [r["image_auroc"] for r in pts], marker=marker, s=70,
                       color=colour, label=f"{size} px, PatchCore, {what}")  # fmt: skip
        for r in an:
            ax.annotate(f"{r['good_parts']} good", (r["fit_cpu_s"], r["image_auroc"]), fontsize=7,
                        xytext=(4, -9), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("train / fit CPU-seconds (log)")
    ax.set_ylabel("defect-vs-good AUROC on the test split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Good parts only (PatchCore) beside the supervised ladder")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--n", default="2000,3000", help="parts per size: one value, or one per size")
    parser.add_argument("--good", default="300,all", help="good training parts to fit on: counts or 'all'")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(".kensa/bench/anomaly"))
    parser.add_argument("--log", type=Path, default=Path("docs/data/anomaly.jsonl"))
    parser.add_argument("--ladder", type=Path, default=Path("docs/data/ladder.jsonl"))
    parser.add_argument("--plot", type=Path, default=Path("docs/images/anomaly.png"))
    parser.add_argument(
        "--retime",
        action="store_true",
        help="only re-measure ONNX img/s of the rows on file (their models are kept in --out), "
        "for a quiet machine after a run that shared its cores",
    )
    args = parser.parse_args()
    configure_cpu_training()
    print(
        f"machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; line seed {args.seed}"
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.n.split(",")]
    counts = counts * len(sizes) if len(counts) == 1 else counts
    args.out.mkdir(parents=True, exist_ok=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in args.log.read_text().splitlines()] if args.log.exists() else []
    if args.retime:
        for r in rows:
            onnx = args.out / onnx_name(r)
            if onnx.exists():
                r["onnx_img_s"] = onnx_images_per_second(onnx, r["size"])
                print(f"{r['key']} {r['size']} px: {r['onnx_img_s']:.0f} img/s", flush=True)
        args.log.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sizes = []
    for size, n in zip(sizes, counts, strict=False):
        data = bench_line(args.out, size, n, args.seed)
        for good in args.good.split(","):
            this = (f"patchcore-{good}", recipe_of(PatchCoreConfig()), size, n, args.seed)
            if any(
                (r["key"], r.get("recipe", RAW_RECIPE), r["size"], r["n"], r["seed"]) == this for r in rows
            ):
                continue
            row = {**measure(data, size, good, args.out, seed=0), "n": n, "seed": args.seed}
            print(json.dumps(row), flush=True)
            with args.log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    ladder = [json.loads(x) for x in args.ladder.read_text().splitlines()] if args.ladder.exists() else []
    plot(rows, ladder, args.plot)
    print(table(rows))
    print(side_by_side(rows, ladder))


if __name__ == "__main__":
    main()
