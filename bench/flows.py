"""Orchestration and tracking overhead: the same pilot as plain calls vs under Prefect + MLflow.

    .venv/bin/python -m bench.flows [--n 600] [--image-size 64] [--epochs 2]

Both runs train, evaluate (with the corruption suite) and export the same model on the same data;
the ratio is wall time under the `pilot` flow (ephemeral Prefect API, MLflow on SQLite, ledger,
artifacts) over wall time of `flows.stages.run_stage` alone. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kensa-bench-flows-"))
    os.environ["KENSA_DATA_DIR"] = str(tmp / "kensa")
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from kensa.flows.stages import run_stage
    from kensa.models.data.ingest import ingest_dataset
    from kensa.models.evaluation.evaluate_run import BandPolicy
    from kensa.models.line.synthetic import generate_dataset
    from kensa.models.train.trainer import TrainConfig
    from kensa.settings import Settings

    data = tmp / "line"
    generate_dataset(data, n=args.n, seed=0, image_size=args.image_size)
    ingest_dataset(data, Settings())
    config = tmp / "kensa.toml"
    config.write_text(
        "[kpi]\nmax_escape_rate = 0.9\nmin_automation_rate = 0.0\nmax_false_reject_rate = 0.9\n"
        f"max_corrupted_escape_rate = 1.0\n[pilot]\nepochs = {args.epochs}\nfraction = 1.0\n"
        "[sweep]\nmax_robustness_images = 192\n"
    )
    cfg = TrainConfig(model="mobilenet_v3_small", epochs=args.epochs, fraction=1.0, seed=0)
    t0 = time.perf_counter()
    run_stage(data, tmp / "plain", cfg, BandPolicy(0.9, 0.1, 0.9), None, 8, 192, show_progress=False)
    plain = time.perf_counter() - t0

    from kensa.flows.pilot import pilot

    # Cold: the first flow in a fresh environment starts the embedded Prefect API and creates
    # the MLflow and store schemas. Warm: the same flow again, as every later run sees it.
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        pilot(data=str(data), config_path=str(config), continue_to_sweep=False)
        times.append(time.perf_counter() - t0)
    cold, warm = times
    print(f"pilot on {args.n} parts at {args.image_size} px, {args.epochs} epochs")
    print("| run | wall s | ratio to plain |\n|---|---|---|")
    print(f"| plain function calls | {plain:.1f} | 1.00× |")
    print(
        f"| `pilot` flow, cold (starts Prefect API, creates MLflow + store) | {cold:.1f} | "
        f"{cold / plain:.2f}× |"
    )
    print(f"| `pilot` flow, warm (Prefect + MLflow + ledger) | {warm:.1f} | {warm / plain:.2f}× |")


if __name__ == "__main__":
    main()
