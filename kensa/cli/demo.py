"""`kensa demo`: the main job on the embedded default, one stage after another, as a user runs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.rule import Rule
from rich.table import Table

from kensa.cli.common import console


def _run(args: list[str]) -> None:
    """Run one kensa command in this process, exactly as typed on the command line."""
    from kensa.cli.main import app

    console.print(Rule(f"[bold]kensa {' '.join(args)}"))
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="kensa", standalone_mode=False)
    except SystemExit as exc:  # pragma: no cover - a failing stage ends the demo with its code
        if exc.code:
            raise
    except typer.Exit as exc:
        if exc.exit_code:
            raise


def demo(
    out: Path = typer.Option(Path(".kensa/demo"), "--out", help="Where the demo writes."),
    n: int = typer.Option(1500, "--n", help="Parts the synthetic line makes."),
    image_size: int = typer.Option(96, "--image-size"),
    epochs: int = typer.Option(8, "--epochs"),
    models: str = typer.Option(
        "mobilenet_v3_small,resnet18", "--models", help="Two or more zoo sizes, smallest first."
    ),
) -> None:
    """Synthetic line → ingest → train two sizes → evaluate under corruptions → export with parity."""
    t0 = time.perf_counter()
    data = out / "line"
    if not (data / ".kensa-dataset.json").exists():
        _run(
            [
                "line",
                "generate",
                "--out",
                str(data),
                "--n",
                str(n),
                "--seed",
                "0",
                "--image-size",
                str(image_size),
            ]
        )
    _run(["data", "ingest", str(data)])
    names = [m.strip() for m in models.split(",") if m.strip()]
    runs: dict[str, Path] = {}
    for name in names:
        run = out / "runs" / name
        _run(
            [
                "train",
                "--data",
                str(data),
                "--model",
                name,
                "--epochs",
                str(epochs),
                "--out",
                str(run),
                "--seed",
                "0",
            ]
        )
        reference = ["--reference", str(runs[names[0]])] if runs else []
        _run(["evaluate", str(run), "--corruptions", *reference])
        _run(["export", str(run), "--out", str(run / "model.onnx"), "--int8"])
        runs[name] = run
    console.print(Rule("[bold]summary"))
    table = Table(
        title=f"demo on {n} synthetic parts at {image_size} px "
        f"({time.perf_counter() - t0:.0f} s in all)"
    )
    for col in (
        "model",
        "params",
        "escape",
        "false reject",
        "automation",
        "band guaranteed",
        "corrupted error",
        "rCE vs smallest",
        "parity max |Δp|",
    ):
        table.add_column(col, justify="right")
    for name, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        train_info = json.loads((run / "train.json").read_text())
        parity = json.loads((run / "model.parity.json").read_text())
        rob = m["robustness"]
        rce = rob["mean_relative_ce"]
        table.add_row(
            name,
            f"{train_info['parameters'] / 1e6:.1f}M",
            f"{m['escape_rate']:.2%}",
            f"{m['false_reject_rate']:.2%}",
            f"{m['automation_rate']:.1%}",
            "yes" if m["band"]["guaranteed"] else "no",
            f"{rob['corrupted_error']:.3f}",
            "1.00 (reference)" if rce is None else f"{rce:.2f}",
            f"{parity['max_abs_prob_diff']:.1e}",
        )
    console.print(table)
    console.print(f"runs, plots and ONNX models: {out / 'runs'}")
