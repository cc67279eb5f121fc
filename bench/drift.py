"""Drift detection on the synthetic line: kensa's budgeted policy against Evidently's defaults.

    .venv/bin/python -m bench.drift [--reps 8] [--clean 20000] [--designs 200:50]

For each shift (lighting drop, colour temperature, blur, noise, camera shift, a new defect type,
a change in class mix) at two severities, ``--reps`` streams start clean and shift at a random
point; a detector's delay is the number of shifted parts seen when it first alarms, and a miss is
no alarm within ``HORIZON`` parts. False alarms are counted over ``--clean`` clean parts, as alerts
(runs of consecutive alarming windows: the monitor keeps one alert open per run) per 10,000 parts.
The same windows go through Evidently's defaults (dataset drift: half the columns drifted by its
default per-column test; embeddings: its default classifier method) as the anchor.
Features are cached under ``.kensa/bench/drift/``; results go to ``results.json`` there and the
delay plot to ``docs/images/drift_delay.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from bench.drift_streams import ROOT, SHIFTS, prepare_model, render_stream
from kensa.monitoring.features import FeatureTable
from kensa.monitoring.policy import DriftPolicy, calibrate
from kensa.monitoring.report import column_scores

HORIZON = 600
PLOT = Path("docs/images/drift_delay.png")
console = Console()
Detector = Callable[[FeatureTable], dict[str, bool]]


def concat(a: FeatureTable, b: FeatureTable) -> FeatureTable:
    return FeatureTable(
        np.concatenate([a.scalars, b.scalars]),
        np.concatenate([a.embedding, b.embedding]),
        np.concatenate([a.probs, b.probs]),
        a.classes,
        [*a.cameras, *b.cameras],
    )


class EvidentlyDefaults:
    """Evidently's default verdicts, computed with its own functions.

    Its embeddings method bootstraps 100 random-score ROC AUCs on the held-out half of reference +
    window (below 1,000 reference rows): that threshold depends only on the two sizes, so it is
    computed once per size with Evidently's own helper, and each window then costs one classifier
    fit. ``check`` confirms on real windows that this gives Evidently's verdicts.
    """

    def __init__(self, reference: FeatureTable, window: int) -> None:
        from evidently.legacy.metrics.data_drift.embedding_drift_methods import calc_roc_auc_random
        from sklearn.model_selection import train_test_split

        self.reference = reference
        n = len(reference)
        self.bootstrap = n < 1000
        target = pd.Series([1] * n + [0] * window)
        _, _, _, y_test = train_test_split(
            pd.DataFrame({"x": np.zeros(n + window)}), target, test_size=0.5, random_state=42, shuffle=True
        )
        aucs = [calc_roc_auc_random(y_test, i) for i in range(100)]
        self.threshold = float(np.percentile(aucs, 95)) if self.bootstrap else 0.55
        self.emb_cols = list(reference.embedding_columns)
        self.ref_emb = pd.DataFrame(reference.embedding, columns=self.emb_cols)

    def embedding_auc(self, window: FeatureTable) -> float:
        from evidently.legacy.metrics.data_drift.embedding_drift_methods import model

        cur = pd.DataFrame(window.embedding, columns=self.emb_cols)
        auc, _, _ = model(bootstrap=False)(cur, self.ref_emb.copy())
        return float(auc)

    def __call__(self, window: FeatureTable) -> dict[str, bool]:
        cols = column_scores(self.reference, window)
        data = sum(c["drifted"] for c in cols) / len(cols) >= 0.5
        emb = self.embedding_auc(window) > self.threshold
        return {"evidently data": data, "evidently embeddings": emb, "evidently (either)": data or emb}

    def check(self, windows: list[FeatureTable]) -> int:
        """Windows on which this matches Evidently's own EmbeddingsDrift default; raises if not."""
        from evidently.legacy.metrics.data_drift.embedding_drift_methods import model

        for w in windows:
            cur = pd.DataFrame(w.embedding, columns=self.emb_cols)
            _, own, _ = model(bootstrap=self.bootstrap)(cur, self.ref_emb.copy())
            if bool(own) != (self.embedding_auc(w) > self.threshold):
                raise AssertionError("the cached embeddings threshold disagrees with Evidently's own")
        return len(windows)


def kensa_detector(policy: DriftPolicy) -> Detector:
    def detect(window: FeatureTable) -> dict[str, bool]:
        level = policy.score(window).level
        return {"kensa": level != "none", "kensa critical": level == "critical"}

    return detect


def window_flags(
    stream: FeatureTable, window: int, stride: int, detectors: list[Detector], start: int = 0
) -> tuple[list[int], dict[str, list[bool]]]:
    """Every detector's verdict on each window ending at ``window + k*stride`` (> ``start``)."""
    ends = [e for e in range(window, len(stream) + 1, stride) if e > start]
    flags: dict[str, list[bool]] = {}
    for end in ends:
        view = stream.take(slice(end - window, end))
        for det in detectors:
            for name, hit in det(view).items():
                flags.setdefault(name, []).append(hit)
    return ends, flags


def episodes(hits: list[bool]) -> int:
    return sum(1 for i, h in enumerate(hits) if h and (i == 0 or not hits[i - 1]))


def run_design(
    window: int,
    stride: int,
    reference: FeatureTable,
    clean: FeatureTable,
    prefix: FeatureTable,
    shifted: dict[tuple[str, int], FeatureTable],
    reps: int,
    progress: Progress,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    policy = calibrate(reference, window=window, stride=stride, false_alarm_per_10k=1.0, n_boot=20_000)
    calib_s = time.perf_counter() - t0
    evidently = EvidentlyDefaults(reference, window)
    checked = evidently.check([clean.take(slice(i * window, (i + 1) * window)) for i in range(3)])
    detectors: list[Detector] = [kensa_detector(policy), evidently]
    task = progress.add_task(f"W={window} clean", total=None)
    _, flags = window_flags(clean, window, stride, detectors)
    progress.update(task, completed=1, total=1)
    false_alarms = {
        name: {"alarm_windows": int(sum(f)), "alerts": episodes(f), "per_10k": episodes(f) / len(clean) * 1e4}
        for name, f in flags.items()
    }
    rng = np.random.default_rng(window * 1000 + stride)
    delays: dict[str, dict[str, list[int | None]]] = {}
    task = progress.add_task(f"W={window} shifted streams", total=len(shifted) * reps)
    for (name, severity), stream in shifted.items():
        for rep in range(reps):
            pre_len = window + int(rng.integers(0, stride))
            pre = prefix.take(slice(rep * (window + stride), rep * (window + stride) + pre_len))
            post = stream.take(slice(rep * HORIZON, (rep + 1) * HORIZON))
            ends, hits = window_flags(concat(pre, post), window, stride, detectors, start=pre_len)
            for det, f in hits.items():
                first = next((ends[i] - pre_len for i, h in enumerate(f) if h), None)
                delays.setdefault(f"{name}|{severity}", {}).setdefault(det, []).append(first)
            progress.advance(task)
    timing = time_windows(policy, evidently, clean, window)
    return {
        "window": window,
        "stride": stride,
        "policy": policy.describe(),
        "calibration_s": calib_s,
        "evidently_threshold_checked_on": checked,
        "evidently_embeddings_threshold": evidently.threshold,
        "false_alarms": false_alarms,
        "delays": delays,
        "timing": timing,
    }


def time_windows(
    policy: DriftPolicy, evidently: EvidentlyDefaults, clean: FeatureTable, window: int
) -> dict[str, float]:
    """Seconds to evaluate one window: kensa's policy, Evidently's tests, Evidently's full report."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from kensa.monitoring.report import frame

    views = [clean.take(slice(i * window, (i + 1) * window)) for i in range(20)]
    t0 = time.perf_counter()
    for v in views:
        policy.score(v)
    kensa_s = (time.perf_counter() - t0) / len(views)
    t0 = time.perf_counter()
    for v in views[:5]:
        evidently(v)
    ev_s = (time.perf_counter() - t0) / 5
    cols = list(frame(views[0]).columns)
    definition = DataDefinition(numerical_columns=cols)
    ref = Dataset.from_pandas(frame(evidently.reference), data_definition=definition)
    Report([DataDriftPreset()]).run(Dataset.from_pandas(frame(views[0]), data_definition=definition), ref)
    t0 = time.perf_counter()
    for v in views[1:3]:
        Report([DataDriftPreset()]).run(Dataset.from_pandas(frame(v), data_definition=definition), ref)
    report_s = (time.perf_counter() - t0) / 2
    return {"kensa_s": kensa_s, "evidently_functions_s": ev_s, "evidently_report_s": report_s}


def summarise(result: dict[str, Any], reps: int) -> list[dict[str, Any]]:
    rows = []
    for key, per_det in result["delays"].items():
        name, severity = key.split("|")
        for det, values in per_det.items():
            caught = [v for v in values if v is not None]
            counted = [HORIZON if v is None else v for v in values]
            rows.append(
                {
                    "shift": name,
                    "severity": ("milder", "stronger")[int(severity)],
                    "detector": det,
                    "median_delay": float(np.median(caught)) if caught else None,
                    "median_delay_miss_as_horizon": float(np.median(counted)),
                    "max_delay": max(caught) if caught else None,
                    "missed": 1 - len(caught) / reps,
                    "within_300": sum(v <= 300 for v in caught) / reps,
                }
            )
    return rows


def plot(rows: list[dict[str, Any]], result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no backend chosen

    dets = ["kensa", "evidently (either)"]
    keys = [(r["shift"], r["severity"]) for r in rows if r["detector"] == "kensa"]
    fig = Figure(figsize=(11, 4.8))
    ax = fig.subplots()
    width = 0.38
    for j, det in enumerate(dets):
        vals = []
        for shift, sev in keys:
            r = next(x for x in rows if x["shift"] == shift and x["severity"] == sev and x["detector"] == det)
            vals.append(r["median_delay_miss_as_horizon"])
        fa = result["false_alarms"][det]["per_10k"]
        ax.bar(
            np.arange(len(keys)) + (j - 0.5) * width,
            vals,
            width,
            label=f"{det} ({fa:.1f} false alarms / 10k parts)",
        )
    ax.axhline(300, color="grey", ls="--", lw=1, label="target: 300 parts")
    ax.set_xticks(np.arange(len(keys)), [f"{s}\n{v}" for s, v in keys], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(f"median delay, parts after onset\n(a miss counts as {HORIZON})")
    ax.set_title(f"Drift detection delay, windows of {result['window']} every {result['stride']} parts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--clean", type=int, default=20_000)
    parser.add_argument("--designs", default="200:50", help="window:stride pairs, comma-separated")
    args = parser.parse_args()
    designs = [tuple(int(x) for x in d.split(":")) for d in args.designs.split(",")]
    max_w = max(w for w, _ in designs) + max(s for _, s in designs)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console) as progress:
        bars: dict[str, Any] = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in bars:
                bars[what] = progress.add_task(what, total=total)
            progress.update(bars[what], completed=done)

        onnx, ref = prepare_model(report)
        clean = render_stream(onnx, {}, seed=101, n=args.clean, progress=report, label="clean stream").table
        prefix = render_stream(
            onnx, {}, seed=102, n=args.reps * max_w, progress=report, label="pre-onset parts"
        ).table
        shifted = {}
        for i, (name, severities) in enumerate(SHIFTS.items()):
            for sev, overrides in enumerate(severities):
                stream = render_stream(
                    onnx,
                    overrides,
                    seed=200 + 10 * i + sev,
                    n=args.reps * HORIZON,
                    progress=report,
                    label=f"{name} ({sev})",
                )
                shifted[(name, sev)] = stream.table
        results = [
            run_design(w, s, ref.table, clean, prefix, shifted, args.reps, progress) for w, s in designs
        ]
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}"
    out = {
        "machine": machine,
        "reference_parts": len(ref.table),
        "reps": args.reps,
        "clean_parts": args.clean,
        "horizon": HORIZON,
        "shifts": {k: [dict(v) for v in s] for k, s in SHIFTS.items()},
        "designs": results,
    }
    (ROOT / "results.json").write_text(json.dumps(out, indent=2, default=str))
    for result in results:
        rows = summarise(result, args.reps)
        result["summary"] = rows
        print_tables(result, rows)
    plot(results[-1]["summary"], results[-1], PLOT)
    (ROOT / "results.json").write_text(json.dumps(out, indent=2, default=str))
    console.print(f"results: {ROOT / 'results.json'}; plot: {PLOT}")


def print_tables(result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    w, s = result["window"], result["stride"]
    fa = Table(
        "detector", "alarming windows", "alerts", "per 10,000 parts", title=f"false alarms, W={w} S={s}"
    )
    for det, v in result["false_alarms"].items():
        fa.add_row(det, str(v["alarm_windows"]), str(v["alerts"]), f"{v['per_10k']:.2f}")
    console.print(fa)
    t = Table(
        "shift",
        "severity",
        "detector",
        "median delay",
        "max delay",
        "within 300",
        "missed",
        title="detection",
    )
    for r in rows:
        med = "–" if r["median_delay"] is None else f"{r['median_delay']:.0f}"
        mx = "–" if r["max_delay"] is None else str(r["max_delay"])
        t.add_row(
            r["shift"], r["severity"], r["detector"], med, mx, f"{r['within_300']:.0%}", f"{r['missed']:.0%}"
        )
    console.print(t)
    tm = result["timing"]
    console.print(
        f"one window: kensa policy {tm['kensa_s'] * 1e3:.1f} ms; Evidently default tests "
        f"{tm['evidently_functions_s'] * 1e3:.0f} ms; Evidently DataDriftPreset report "
        f"{tm['evidently_report_s']:.2f} s; calibration {result['calibration_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
