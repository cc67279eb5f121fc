"""``kensa line``: synthetic line datasets and sample sheets (thin over ``kensa.models.line.synthetic``)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from kensa.cli.common import ExitCode, console, err_console, fail

app = typer.Typer(
    help="The synthetic line: datasets of machined parts under shop-floor conditions.",
    no_args_is_help=True,
)


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder (new, empty, or a previous output).")],
    n: Annotated[int, typer.Option("--n", help="Number of parts (images).")],
    seed: Annotated[int, typer.Option("--seed", help="Seed; the same seed gives byte-identical files.")],
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels (32..1024).")] = 128,
    defect_rate: Annotated[
        float | None, typer.Option("--defect-rate", help="Share of defective parts, 0..1 (default 0.3).")
    ] = None,
    condition: Annotated[
        list[str] | None,
        typer.Option(
            "--condition",
            "-c",
            help="Line condition override name=value, repeatable "
            "(e.g. lighting=0.6, color_temp=4000, focus_blur=2, variant=B, "
            "defect_mix=scratch:2,crack:1).",
        ),
    ] = None,
) -> None:
    """Write an ImageFolder dataset (``<class>/<part>.png``) plus ``manifest.csv``."""
    from kensa.models.line.synthetic import LineConditions, generate_dataset, read_manifest

    try:
        conditions = LineConditions().with_overrides(condition or [])
        if defect_rate is not None:
            conditions = conditions.with_overrides({"defect_rate": defect_rate})
    except ValueError as exc:
        raise fail(str(exc)) from None

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
            raise fail(str(exc)) from None
    elapsed = time.perf_counter() - started

    counts = Counter(row["label"] for row in read_manifest(manifest))
    table = Table(title=f"{n} parts, seed {seed}, {image_size} px")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    for label, count in sorted(counts.items(), key=lambda kv: (kv[0] != "ok", kv[0])):
        table.add_row(escape(label), str(count), f"{count / n:.1%}")
    console.print(table)
    console.print(f"manifest: {escape(str(manifest))}  ({n / elapsed:.0f} images/s)")


@app.command()
def samples(
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG sheets.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the parts shown.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels (32..1024).")] = 128,
) -> None:
    """Save ``samples_by_class.png`` and ``samples_by_condition.png`` sheets."""
    from kensa.models.line.synthetic import save_sample_sheets

    if seed < 0:
        raise fail(f"seed={seed}; need a seed >= 0")
    try:
        paths = save_sample_sheets(out, seed=seed, image_size=image_size)
    except ValueError as exc:
        raise fail(str(exc)) from None
    for path in paths:
        console.print(f"wrote {escape(str(path))}")


@app.command()
def stream(
    url: Annotated[str, typer.Option("--url", help="The service, e.g. http://127.0.0.1:8000.")],
    key: Annotated[str, typer.Option("--key", help="API key with the 'line' role (or higher).")],
    n: Annotated[int, typer.Option("--n", help="Number of parts to send.")],
    rate: Annotated[
        float | None,
        typer.Option("--rate", help="Parts per second (default: as fast as the service answers)."),
    ] = None,
    shift: Annotated[
        list[str] | None,
        typer.Option(
            "--shift",
            help="Line condition changed from part --shift-at on, name=value, repeatable: lighting, "
            "colour_temp, blur, motion_blur, noise, camera_shift, rotation, glare, variant, "
            "new_defect (a defect type), class_mix (defect share), defect_mix.",
        ),
    ] = None,
    shift_at: Annotated[int, typer.Option("--shift-at", help="First shifted part (0 = all of them).")] = 0,
    line_id: Annotated[str, typer.Option("--line-id", help="Line id sent with every part.")] = "L1",
    camera_id: Annotated[
        str | None,
        typer.Option(
            "--camera-id",
            help="Camera id sent with every part (C1/C2 also render that "
            "camera); default: each part's own camera.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Stream seed; the same seed sends the same parts.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels (32..1024).")] = 64,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Requests in flight at once.")] = 8,
    batch: Annotated[
        int, typer.Option("--batch", help="Parts per request, 1..16 (>1 uses /v1/inspect/batch: faster).")
    ] = 1,
    retries: Annotated[int, typer.Option("--retries", help="Retries per part on connection errors/503.")] = 4,
) -> None:
    """Send a simulated line's parts to a running service, optionally shifting a condition."""
    from kensa.cli.stream import StreamError, run_stream
    from kensa.models.line.stream import StreamPlan, parse_shifts

    shift = shift or []
    if n < 1:
        raise fail(f"--n {n}; send at least 1 part")
    if shift_at and not shift:
        raise fail("--shift-at needs at least one --shift name=value")
    if not 0 <= shift_at < max(n, 1):
        raise fail(f"--shift-at {shift_at} is outside the stream's parts 0..{n - 1}")
    try:
        plan = StreamPlan(
            n=n,
            seed=seed,
            image_size=image_size,
            line=line_id,
            camera=camera_id if camera_id in ("C1", "C2") else None,
            shift=parse_shifts(shift),
            shift_at=shift_at,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[verdicts]}"),
        TimeRemainingColumn(),
    )
    counts: Counter[str] = Counter()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("sending", total=n, verdicts="")

        def tick(result: Any) -> None:
            counts[result.verdict or "error"] += 1
            shown = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            progress.update(task, advance=1, verdicts=shown)

        try:
            summary = run_stream(
                plan,
                url,
                key,
                rate=rate,
                concurrency=concurrency,
                batch=batch,
                retries=retries,
                line_id=line_id,
                camera_id=camera_id,
                progress=tick,
            )
        except StreamError as exc:
            # Refused input (a bad key, a bad URL) or a service that cannot be reached.
            raise fail(str(exc), ExitCode.INVALID if exc.invalid else ExitCode.UNAVAILABLE) from None
    _print_summary(summary)
    if summary.errors:
        raise typer.Exit(ExitCode.FAILURE)


def _print_summary(summary: Any) -> None:
    plan = summary.plan
    shifted = ", ".join(f"{k}={v}" for k, v in plan.shift.items())
    title = f"{len(summary.results)} parts of line {plan.line}, seed {plan.seed}" + (
        f"; {shifted} from part {plan.shift_at}" if shifted else ""
    )
    table = Table(title=escape(title))
    for col in ("model version", "phase", "parts", "ok", "defect", "review", "escapes", "false rejects"):
        table.add_column(col, justify="left" if col in ("model version", "phase") else "right")
    for row in summary.by_model():
        table.add_row(
            escape(row["model"]),
            escape(row["phase"]),
            str(row["parts"]),
            str(row["ok"]),
            str(row["defect"]),
            str(row["review"]),
            f"{row['escapes']}/{row['defective']}",
            f"{row['false_rejects']}/{row['good']}",
        )
    console.print(table)
    rate = len(summary.results) / summary.seconds if summary.seconds else 0.0
    console.print(
        f"{len(summary.judged)} judged, {len(summary.errors)} failed, {summary.retries} retries "
        f"in {summary.seconds:.1f} s ({rate:.0f} parts/s); idempotency keys {escape(summary.run_key)}-*"
    )
    for failed in summary.errors[:5]:
        err_console.print(f"[red]part {escape(failed.part_id)}:[/red] {escape(failed.error or '')}")
