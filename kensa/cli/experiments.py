"""`kensa register` and `kensa compare`: a data scientist's own model through the same gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import ExitCode, JsonOpt, console, err_console, fail, get_settings, print_json


def _triple(text: str | None, what: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise fail(f"--{what} takes three numbers R,G,B (e.g. 0.485,0.456,0.406); got {text!r}")
    return values[0], values[1], values[2]


def _params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise fail(f"--param takes KEY=VALUE; got {pair!r}")
        out[key.strip()] = value
    return out


def _print_gate(gate: dict[str, Any], title: str) -> None:
    table = Table(title=escape(title))
    for col in ("gate", "target", "achieved", ""):
        table.add_column(col, justify="left" if col == "gate" else "right")
    for row in gate["rows"]:
        mark = "[green]passed[/green]" if row["passed"] else "[red]missed[/red]"
        table.add_row(escape(str(row["kpi"])), escape(str(row["target"])), escape(str(row["achieved"])), mark)
    console.print(table)


def register_cmd(
    model: Annotated[
        Path, typer.Argument(help="ONNX file, TorchScript file, kensa checkpoint or state dict.")
    ],
    data: Annotated[Path, typer.Option("--data", help="Ingested dataset folder to judge it on.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Experiment name (default: the file name).")
    ] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="Zoo architecture of a state dict.")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="ONNX float input: R,G,B mean on [0,1].")] = None,
    std: Annotated[str | None, typer.Option("--std", help="ONNX float input: R,G,B std on [0,1].")] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who registers it (default: you).")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="KEY=VALUE logged with the run; repeatable.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="kensa.toml with the KPI.")] = None,
) -> None:
    """Judge an existing model like a flow-made one; register it as candidate if it passes."""
    settings = get_settings()
    from kensa.cli.flows import prepare_prefect

    prepare_prefect(settings)  # flows import Prefect, which reads its home at import
    from kensa.flows.config import ConfigError
    from kensa.models.data.ingest import DatasetError
    from kensa.models.nets.zoo import IMAGENET_MEAN, IMAGENET_STD
    from kensa.notebook.experiments import IncompatibleModelError, register_model

    mean_v, std_v = _triple(mean, "mean") or IMAGENET_MEAN, _triple(std, "std") or IMAGENET_STD
    try:
        result = register_model(
            model,
            dataset=data,
            name=name,
            arch=arch,
            mean=mean_v,
            std=std_v,
            params=_params(param or []),
            registered_by=by,
            config=config,
            settings=settings,
        )
    except IncompatibleModelError as exc:
        raise fail(f"{model.name} cannot be registered: {exc}") from None
    except (ConfigError, DatasetError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    from kensa.cli.modeling import print_band, print_parity

    console.print(
        f"[bold]{escape(result.name)}[/bold] "
        + escape(f"({result.extra['file_kind']}): {result.extra['signature']}")
    )
    print_band(result.band)
    if "max_abs_prob_diff" in result.parity:
        print_parity(result.parity)
    _print_gate(result.gate, f"gates for {result.name} (MLflow run {result.run_id[:8]})")
    if not result.passed:
        err_console.print(
            "[red]not registered[/red]: "
            + escape("; ".join(result.reasons))
            + f"\nthe evidence stays in MLflow run {result.run_id}",
            soft_wrap=True,
        )
        raise typer.Exit(ExitCode.GATE)
    cost = result.serving_cost_per_million or 0.0
    console.print(
        f"[bold]candidate[/bold]: {escape(result.registry_name)} version {result.model_version} "
        f"({result.latency_ms_per_image or 0:.2f} ms/image, {cost:.3f} {escape(result.currency)} "
        "per million parts)"
    )
    console.print(f"approve with: kensa approve {result.model_version} --by NAME --reason TEXT")


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return {"pct": f"{value:.2%}", "pct1": f"{value:.1%}", "ratio": f"{value:.2f}", "ms": f"{value:.3f}"}.get(
        kind, f"{value:.3f}"
    )


def compare_cmd(
    version_a: Annotated[str, typer.Argument(help="First version (the reference for relative CE).")],
    version_b: Annotated[str, typer.Argument(help="Second version.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Registered model name (default: the project's).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the plot and JSON report.")] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Dataset (default: the one version A was judged on).")
    ] = None,
    max_images: Annotated[
        int | None, typer.Option("--max-images", min=8, help="Parts in the corruption suite.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="kensa.toml (serving plan, registry name).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Two registry versions side by side: same test parts, same corrupted copies, same clock."""
    settings = get_settings()
    from kensa.cli.flows import prepare_prefect

    prepare_prefect(settings)
    from kensa.flows.config import ConfigError
    from kensa.models.data.ingest import DatasetError
    from kensa.notebook.compare import CompareError, compare_versions

    try:
        result = compare_versions(
            version_a,
            version_b,
            name=name,
            data=data,
            out=out,
            config=config,
            settings=settings,
            max_robustness_images=max_images,
            show_progress=not as_json,  # a progress bar on stdout would break the JSON
        )
    except (CompareError, ConfigError, DatasetError, ValueError) as exc:
        raise fail(str(exc)) from None
    c = result.comparison
    if as_json:
        print_json(
            {**c.to_dict(), "notes": result.notes, "plot": str(result.plot), "report": str(result.report)}
        )
        return
    a, b = c.rows
    table = Table(
        title=escape(f"{a.label} vs {b.label} on {c.n_test} test parts ({c.n_corrupted} corrupted)")
    )
    table.add_column("")
    for row in (a, b):
        table.add_column(escape(f"{row.label} {row.model_name} ({row.input_size}px)"), justify="right")
    lines = [
        ("escape rate", "escape_rate", "pct"),
        ("false reject rate", "false_reject_rate", "pct"),
        ("automation rate", "automation_rate", "pct1"),
        ("corrupted escape rate", "corrupted_escape_rate", "pct"),
        (f"relative CE (vs {a.label})", "relative_ce", "ratio"),
        ("latency ms/image", "latency_ms_per_image", "ms"),
        (f"cost per million parts ({c.currency})", "cost_per_million", "money"),
    ]
    for label, key, kind in lines:
        table.add_row(escape(label), _fmt(getattr(a, key), kind), _fmt(getattr(b, key), kind))
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    console.print(f"plot: {escape(str(result.plot))}  report: {escape(str(result.report))}")


def recalibrate_cmd(
    version: Annotated[str, typer.Argument(help="Registered version whose band is recalibrated.")],
    by: Annotated[str, typer.Option("--by", help="Who recalibrates (recorded in the audit log).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Dataset whose calibration split sets the band (default: the version's own)."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Registered model name (default: the project's).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="kensa.toml (KPI: the guarantee and the gate).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """New thresholds for a registered model, no refit: calibrated, gated, registered as a candidate."""
    settings = get_settings()
    from kensa.flows.config import ConfigError
    from kensa.flows.gate import GateFailedError
    from kensa.models.data.ingest import DatasetError
    from kensa.notebook.compare import CompareError
    from kensa.notebook.recalibrate import recalibrate_version

    try:
        result = recalibrate_version(
            version, registered_by=by, reason=reason, name=name, data=data, config=config, settings=settings
        )
    except GateFailedError as exc:
        err_console.print(f"[red]not registered[/red]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(ExitCode.GATE) from None
    except (CompareError, ConfigError, DatasetError, ValueError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        print_json(result.to_dict())
        return
    table = Table(title=escape(f"{result.name} v{result.from_version} → v{result.version} (same graph)"))
    for column in ("", f"v{result.from_version}", f"v{result.version}"):
        table.add_column(escape(column), justify="right" if column else "left")
    for key in ("t_ok", "t_defect"):
        old, new = result.previous_band.get(key), result.band[key]
        table.add_row(key, "-" if old is None else f"{old:.4f}", f"{new:.4f}")
    was = result.previous_band.get("guaranteed", "-")
    table.add_row("guaranteed", str(was), str(result.band["guaranteed"]))
    console.print(table)
    t = result.test
    console.print(
        f"test split with the new band: escape {t['escape_rate']:.2%}, false reject "
        f"{t['false_reject_rate']:.2%}, automation {t['automation_rate']:.1%}"
    )
    console.print(escape(result.band.get("message", "")), soft_wrap=True)
    console.print(f"approve with: kensa approve {result.version} --by NAME --reason TEXT")
