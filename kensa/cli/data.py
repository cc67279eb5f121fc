"""`kensa data`: turn a folder of a user's own images into a validated, versioned dataset."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from kensa.cli.common import ExitCode, console, err_console, fail, get_settings
from kensa.settings import Settings

if TYPE_CHECKING:
    from kensa.models.data.ingest import DatasetCard

app = typer.Typer(help="Datasets: ingest and validate a user's own images.", no_args_is_help=True)


def _with_classes(settings: Settings, classes: str | None) -> Settings:
    if classes is None:
        return settings
    try:
        # model_validate re-runs the validators (ok first, unique, one defect) on the override.
        return Settings.model_validate({**settings.model_dump(), "classes": classes})
    except ValidationError as exc:
        detail = "; ".join(str(e["msg"]) for e in exc.errors())
        raise fail(f"invalid --classes {classes!r}: {detail}") from None


def _count_table(title: str, rows: dict[str, dict[str, int]], columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    for column in [*columns, "total"]:
        table.add_column(column, justify="right")
    totals = dict.fromkeys(columns, 0)
    for name, counts in rows.items():
        for column in columns:
            totals[column] += counts.get(column, 0)
        table.add_row(name, *(str(counts.get(c, 0)) for c in columns), str(sum(counts.values())))
    table.add_row("total", *(str(totals[c]) for c in columns), str(sum(totals.values())), style="dim")
    return table


def _print_card(card: DatasetCard) -> None:
    from kensa.models.data.ingest import SPLITS

    console.print(_count_table("images per class and split", card.by_class_split, list(SPLITS)))
    labels = list(card.by_class_split)
    for title, rows in (
        ("per line", card.by_line),
        ("per camera", card.by_camera),
        ("per variant", card.by_variant),
    ):
        if rows:
            console.print(_count_table(f"images {title} and class", rows, labels))
    sizes = Table(title="image sizes (w x h)", title_justify="left")
    sizes.add_column("size")
    sizes.add_column("images", justify="right")
    for size, n in card.image_sizes.items():
        sizes.add_row(size, str(n))
    console.print(sizes)
    formats = ", ".join(f"{fmt} {n}" for fmt, n in card.formats.items())
    console.print(Text(f"{card.total} images; formats: {formats}"), soft_wrap=True)


@app.command()
def ingest(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Dataset root folder.")],
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest",
            help="CSV with path,label[,split,part_id,line,camera,...]; "
            "paths relative to DIR. Default: DIR/manifest.csv if present, else class folders.",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="Accepted labels, comma-separated, 'ok' first (default: settings)."),
    ] = None,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="classify (ok + defect classes), anomaly (learn from ok parts only; defective "
            "parts optional, for calibration and test) or auto: anomaly when every part is ok.",
        ),
    ] = "auto",
) -> None:
    """Validate, split and version a dataset; write DIR/.kensa-dataset.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from kensa.models.data.ingest import DATASET_FILE, TASKS, DatasetError, ingest_dataset

    if task not in TASKS:
        raise fail(f"--task {task!r} is not accepted; use one of: {', '.join(TASKS)}", ExitCode.INVALID)
    settings = _with_classes(get_settings(), classes)
    with Progress(
        TextColumn("checking images"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
        # A bar redrawn into a pipe or log file is noise; show it only on a terminal.
        disable=not console.is_terminal,
    ) as bar:
        bar_task = bar.add_task("check", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(bar_task, completed=done, total=total)

        try:
            dataset = ingest_dataset(directory, settings, manifest=manifest, progress=advance, task=task)
        except DatasetError as exc:
            bar.stop()
            # The report is many lines that start with what is wrong; print it as it is (Text:
            # markup-safe), without an `error:` prefix.
            err_console.print(Text(str(exc)), soft_wrap=True, highlight=False)
            raise typer.Exit(ExitCode.INVALID) from None
        except OSError as exc:
            # The data was valid but the dataset file could not be written (read-only folder).
            bar.stop()
            raise fail(f"cannot write {DATASET_FILE} in {directory}: {exc}", ExitCode.FAILURE) from None

    for note in dataset.notes:
        err_console.print(Text(str(note)), soft_wrap=True, highlight=False)
    console.print(
        Text.assemble(
            "dataset version ",
            (dataset.short_version, "bold green"),
            f"  (sha256 {dataset.version})",
        ),
        soft_wrap=True,
    )
    console.print(
        Text(
            f"task: {dataset.task}; classes: {', '.join(dataset.classes)}; "
            f"written {dataset.root / DATASET_FILE}"
        ),
        soft_wrap=True,
    )
    _print_card(dataset.card)
