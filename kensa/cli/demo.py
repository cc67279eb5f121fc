"""`kensa demo`: the main job on the embedded default, one stage after another, as a user runs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import typer
from rich.rule import Rule
from rich.table import Table

from kensa.cli.common import console

# `kensa pilot` exits 3 when the KPI gate stops the flow: a result to show, not a crash.
EXIT_GATE = 3


def _run(args: list[str], allow: tuple[int, ...] = (0,)) -> int:
    """Run one kensa command in this process, exactly as typed on the command line."""
    from kensa.cli.main import app

    console.print(Rule(f"[bold]kensa {' '.join(args)}"))
    command = typer.main.get_command(app)
    try:
        # Without standalone mode click returns a command's exit code instead of exiting.
        result = command.main(args=args, prog_name="kensa", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except (click.exceptions.Exit, typer.Exit) as exc:
        code = int(getattr(exc, "exit_code", 1) or 0)
    if code not in allow:
        console.print(f"[red]kensa {args[0]} failed (exit {code}); the demo stops here[/red]")
        raise typer.Exit(code)
    return code


def demo(
    out: Path = typer.Option(Path(".kensa/demo"), "--out", help="Where the demo writes."),
    n: int = typer.Option(2000, "--n", help="Parts the synthetic line makes."),
    image_size: int = typer.Option(64, "--image-size"),
    epochs: int = typer.Option(15, "--epochs"),
    models: str = typer.Option(
        "small_cnn,mobilenet_v3_small", "--models", help="Zoo sizes for the model core, smallest first."
    ),
    config: Path = typer.Option(Path("examples/kensa.toml"), "--config", help="Project config."),
    pilot: bool = typer.Option(True, "--pilot/--no-pilot", help="Run the staged flow at the end."),
) -> None:
    """Synthetic line → ingest → train sizes, evaluate under corruptions, export → pilot + gate."""
    t0 = time.perf_counter()
    data = out / "line"
    if not (data / ".kensa-dataset.json").exists():
        _run(["line", "generate", "--out", str(data), "--n", str(n), "--seed", "0",
              "--image-size", str(image_size)])  # fmt: skip
    _run(["data", "ingest", str(data)])
    names = [m.strip() for m in models.split(",") if m.strip()]
    runs: dict[str, Path] = {}
    for name in names:
        run = out / "runs" / name
        _run(["train", "--data", str(data), "--model", name, "--epochs", str(epochs),
              "--out", str(run), "--seed", "0"])  # fmt: skip
        # Relative corruption error is measured against the smallest model (ImageNet-C style).
        reference = ["--reference", str(runs[names[0]])] if runs else []
        _run(["evaluate", str(run), "--corruptions", "--alpha", "0.05", *reference])
        _run(["export", str(run), "--out", str(run / "model.onnx"), "--int8"])
        runs[name] = run
    gate = 0
    if pilot:
        gate = _run(["pilot", "--data", str(data), "--config", str(config),
                     "--by", "demo-data-scientist"], allow=(0, EXIT_GATE))  # fmt: skip
    console.print(Rule("[bold]summary"))
    elapsed = time.perf_counter() - t0
    table = Table(title=f"kensa demo: {n} synthetic parts at {image_size} px, {elapsed:.0f} s in all")
    for col in ("model", "params", "escape", "false reject", "automation", "band guaranteed",
                "clean error", "corrupted error", "rCE vs smallest", "parity max |Δp|"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        info = json.loads((run / "train.json").read_text())
        parity = json.loads((run / "model.parity.json").read_text())
        rce = m["robustness"]["mean_relative_ce"]
        table.add_row(
            name,
            f"{info['parameters'] / 1e6:.1f}M",
            f"{m['escape_rate']:.2%}",
            f"{m['false_reject_rate']:.2%}",
            f"{m['automation_rate']:.1%}",
            "yes" if m["band"]["guaranteed"] else "no",
            f"{m['error']:.3f}",
            f"{m['robustness']['corrupted_error']:.3f}",
            "reference" if rce is None else f"{rce:.2f}",
            f"{parity['max_abs_prob_diff']:.1e}",
        )
    console.print(table)
    outcome = "not run" if not pilot else ("passed" if gate == 0 else "stopped the flow")
    console.print(f"pilot KPI gate: {outcome}")
    if gate == EXIT_GATE:
        console.print(
            "The pilot missed its KPI, so the flow stopped before any scale spend; "
            "the gap is printed above and recorded in MLflow."
        )
    console.print(
        f"runs, plots and ONNX models: {out / 'runs'}; MLflow: `mlflow ui "
        "--backend-store-uri sqlite:///.kensa/mlflow.db`"
    )
