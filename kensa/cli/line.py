"""``kensa line``: synthetic line datasets and sample sheets (thin over ``models.synthetic``)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import NoReturn

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from kensa.cli.common import EXIT_INVALID, console, err_console

app = typer.Typer(
    help="The synthetic line: datasets of machined parts under shop-floor conditions.",
    no_args_is_help=True,
)


def _invalid(message: str) -> NoReturn:
    err_console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(EXIT_INVALID)


@app.command()
def generate(
    out: Path = typer.Option(
        ..., "--out", help="Dataset folder (new, empty, or a previous output)."
    ),
    n: int = typer.Option(..., "--n", help="Number of parts (images)."),
    seed: int = typer.Option(..., "--seed", help="Seed; the same seed gives byte-identical files."),
    image_size: int = typer.Option(128, "--image-size", help="Image side in pixels (32..1024)."),
    defect_rate: float | None = typer.Option(
        None, "--defect-rate", help="Share of defective parts, 0..1 (default 0.3)."
    ),
    condition: list[str] = typer.Option(
        [],
        "--condition",
        "-c",
        help="Line condition override name=value, repeatable "
        "(e.g. lighting=0.6, color_temp=4000, focus_blur=2, variant=B, "
        "defect_mix=scratch:2,crack:1).",
    ),
) -> None:
    """Write an ImageFolder dataset (``<class>/<part>.png``) plus ``manifest.csv``."""
    from models.synthetic import LineConditions, generate_dataset, read_manifest

    try:
        conditions = LineConditions().with_overrides(condition)
        if defect_rate is not None:
            conditions = conditions.with_overrides({"defect_rate": defect_rate})
    except ValueError as exc:
        _invalid(str(exc))

    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    started = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("parts", total=max(n, 1))
        try:
            manifest = generate_dataset(
                out,
                n,
                seed,
                image_size=image_size,
                conditions=conditions,
                progress=lambda done, _total: progress.update(task, completed=done),
            )
        except ValueError as exc:
            _invalid(str(exc))
    elapsed = time.perf_counter() - started

    counts = Counter(row["label"] for row in read_manifest(manifest))
    table = Table(title=f"{n} parts, seed {seed}, {image_size} px")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    for label, count in sorted(counts.items(), key=lambda kv: (kv[0] != "ok", kv[0])):
        table.add_row(label, str(count), f"{count / n:.1%}")
    console.print(table)
    console.print(f"manifest: {escape(str(manifest))}  ({n / elapsed:.0f} images/s)")


@app.command()
def samples(
    out: Path = typer.Option(..., "--out", help="Folder for the PNG sheets."),
    seed: int = typer.Option(0, "--seed", help="Seed of the parts shown."),
    image_size: int = typer.Option(128, "--image-size", help="Image side in pixels (32..1024)."),
) -> None:
    """Save ``samples_by_class.png`` and ``samples_by_condition.png`` sheets."""
    from models.synthetic import save_sample_sheets

    if seed < 0:
        _invalid(f"seed={seed}; need a seed >= 0")
    try:
        paths = save_sample_sheets(out, seed=seed, image_size=image_size)
    except ValueError as exc:
        _invalid(str(exc))
    for path in paths:
        console.print(f"wrote {escape(str(path))}")
