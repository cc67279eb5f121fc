"""`kensa audit export` and `kensa audit verify`: a model version's evidence in one checkable archive."""

from __future__ import annotations

import getpass
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import EXIT_INVALID, console, err_console, get_settings

app = typer.Typer(
    help="Audit bundles: export a model version's evidence, verify a bundle.", no_args_is_help=True
)


_RESULT = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[dim]skip[/dim]"}


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(EXIT_INVALID)


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


@app.command("export")
def export_cmd(
    version: str = typer.Argument(..., help="Model version in the registry."),
    out: Path = typer.Option(..., "--out", help="Archive to write (.tar.gz)."),
    name: str | None = typer.Option(None, "--name", help="Registered model name (default: the project's)."),
    data: Path | None = typer.Option(
        None, "--data", help="Ingested dataset folder (default: the one the training run recorded)."
    ),
    config: Path | None = typer.Option(None, "--config", help="kensa.toml to include and name the model."),
    by: str | None = typer.Option(None, "--by", help="Who exports (recorded in the audit log)."),
) -> None:
    """Write one archive: model card, data manifest, configs, parity, ONNX, approvals, audit events."""
    settings = get_settings()
    from kensa.flows.config import ConfigError, load_project_config
    from kensa.governance.audit_export import AuditExportError, export_bundle

    try:
        project = load_project_config(config or settings.project_config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if data is not None and not data.is_dir():
        raise _fail(f"--data {data} is not a folder")
    model = name or project.name
    try:
        report = export_bundle(
            settings,
            model,
            version,
            out,
            exported_by=by or _default_actor(),
            data=data,
            project_config=project.model_dump(mode="json") if (config or settings.project_config) else None,
        )
    except AuditExportError as exc:
        raise _fail(str(exc)) from None
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    console.print(
        f"[green]wrote[/green] {escape(str(report.path))} "
        f"({report.bytes / 1e6:.1f} MB, {report.files} files): "
        f"{report.name} version {report.version}, {report.events} audit events, "
        f"{report.decisions} approval decisions; MANIFEST.sha256 {report.manifest_sha256[:16]}…"
    )
    console.print(f"check it with: kensa audit verify {escape(str(report.path))}")


@app.command("verify")
def verify_cmd(
    file: Path = typer.Argument(..., help="An audit bundle (.tar.gz) made by `kensa audit export`."),
    live: bool = typer.Option(
        False,
        "--live",
        help="Also compare with the store's audit trail and the registry (KENSA_* settings), read only.",
    ),
) -> None:
    """Recompute every hash, the audit chain and the ONNX parity; exit 0 pass, 1 fail, 2 unreadable."""
    from kensa.governance.bundle import BundleError
    from kensa.governance.verify import verify_bundle

    try:
        info, checks = verify_bundle(file, get_settings() if live else None)
    except BundleError as exc:
        raise _fail(str(exc)) from None
    model = info.get("model") or {}
    table = Table(
        title=f"audit bundle {escape(file.name)}: {escape(str(model.get('name')))} "
        f"version {escape(str(model.get('version')))}"
    )
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in checks:
        table.add_row(check.name, _RESULT[check.passed], escape(check.detail))
    console.print(table)
    failed = [c.name for c in checks if c.passed is False]
    if failed:
        console.print(f"[red]verification failed[/red]: {', '.join(failed)}")
        raise typer.Exit(1)
    console.print(
        f"[green]verified[/green]: exported {info.get('exported_at')} "
        f"by {escape(str(info.get('exported_by')))}"
    )
