"""`kensa audit export` and `kensa audit verify`: a model version's evidence in one checkable archive."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import ExitCode, JsonOpt, console, fail, get_settings, print_json, warn

app = typer.Typer(
    help="Audit bundles: export a model version's evidence, verify a bundle.", no_args_is_help=True
)


_RESULT = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[dim]skip[/dim]"}


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


@app.command("export")
def export_cmd(
    version: Annotated[str, typer.Argument(help="Model version in the registry.")],
    out: Annotated[Path, typer.Option("--out", help="Archive to write (.tar.gz).")],
    name: Annotated[
        str | None, typer.Option("--name", help="Registered model name (default: the project's).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Ingested dataset folder (default: the one the training run recorded)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="kensa.toml to include and name the model.")
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who exports (recorded in the audit log).")] = None,
) -> None:
    """Write one archive: model card, data manifest, configs, parity, ONNX, approvals, audit events."""
    settings = get_settings()
    from kensa.flows.config import ConfigError, load_project_config
    from kensa.governance.audit_export import AuditExportError, export_bundle

    try:
        project = load_project_config(config or settings.project_config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if data is not None and not data.is_dir():
        raise fail(f"--data {data} is not a folder")
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
        raise fail(str(exc)) from None
    for warning in report.warnings:
        warn(warning)
    console.print(
        f"[green]wrote[/green] {escape(str(report.path))} "
        f"({report.bytes / 1e6:.1f} MB, {report.files} files): "
        f"{escape(report.name)} version {escape(str(report.version))}, {report.events} audit events, "
        f"{report.decisions} approval decisions; MANIFEST.sha256 {report.manifest_sha256[:16]}…"
    )
    console.print(f"check it with: kensa audit verify {escape(str(report.path))}")


@app.command("verify")
def verify_cmd(
    file: Annotated[Path, typer.Argument(help="An audit bundle (.tar.gz) made by `kensa audit export`.")],
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Also compare with the store's audit trail and the registry (KENSA_* settings), read only.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recompute every hash, the audit chain and the ONNX parity; exit 0 pass, 3 fail, 2 unreadable."""
    from kensa.governance.bundle import BundleError
    from kensa.governance.verify import verify_bundle

    try:
        info, checks = verify_bundle(file, get_settings() if live else None)
    except BundleError as exc:
        raise fail(str(exc)) from None
    model = info.get("model") or {}
    failed = [c.name for c in checks if c.passed is False]
    if as_json:
        print_json(
            {
                "bundle": str(file),
                "model": {"name": model.get("name"), "version": model.get("version")},
                "exported_at": info.get("exported_at"),
                "exported_by": info.get("exported_by"),
                "passed": not failed,
                "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks],
            }
        )
    else:
        table = Table(
            title=f"audit bundle {escape(file.name)}: {escape(str(model.get('name')))} "
            f"version {escape(str(model.get('version')))}"
        )
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for check in checks:
            table.add_row(escape(check.name), _RESULT[check.passed], escape(check.detail))
        console.print(table)
    if failed:
        if not as_json:
            console.print(f"[red]verification failed[/red]: {escape(', '.join(failed))}")
        raise typer.Exit(ExitCode.GATE)
    if not as_json:
        console.print(
            f"[green]verified[/green]: exported {escape(str(info.get('exported_at')))} "
            f"by {escape(str(info.get('exported_by')))}"
        )
