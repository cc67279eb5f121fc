"""`kensa pilot`, `approve`, `reject`, `rollback`, `cost`: thin commands over flows/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kensa.cli.common import EXIT_INVALID, console, err_console, get_settings
from kensa.settings import Settings


def prepare_prefect(settings: Settings) -> None:
    """Prefect reads its own environment: point it at the embedded home or the configured API.

    Must run before the first ``import prefect``; this is the one place kensa sets it.
    """
    settings.ensure_dirs()
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home.resolve()))
    if settings.prefect_api_url:
        os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded API starts as a subprocess; on a busy 2-core machine 20 s is not enough.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO")


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(EXIT_INVALID)


def print_sweep(summary: dict[str, Any], currency: str) -> None:
    table = Table(title="scale sweep (TCO = training + serving over the planned life)")
    for col in (
        "trial",
        "target",
        "params",
        "clean err",
        "corrupted err",
        "corrupted escape",
        f"train {currency}",
        f"serve {currency}/M",
        "TCO",
        "KPI",
    ):
        table.add_column(col, justify="right")
    chosen = summary["chosen"]["key"]
    for t in summary["trials"]:
        table.add_row(
            ("→ " if t["key"] == chosen else "") + t["key"],
            t["target"],
            f"{t['parameters'] / 1e6:.1f}M",
            f"{t['clean_error']:.3f}",
            f"{t['corrupted_error']:.3f}",
            f"{t['corrupted_escape_rate']:.2%}",
            f"{t['training_cost']:.3f}",
            f"{t['serving_cost_per_million']:.3f}",
            f"{t['tco']:.2f}",
            "[green]meets[/green]" if t["meets_kpi"] else "[red]misses[/red]",
        )
    console.print(table)


def pilot_cmd(
    data: Path = typer.Option(..., "--data", help="Ingested dataset folder."),
    config: Path | None = typer.Option(None, "--config", help="kensa.toml (default: built-in)."),
    seed: int = typer.Option(0, "--seed"),
    no_sweep: bool = typer.Option(False, "--no-sweep", help="Stop after the pilot's KPI gate."),
    by: str = typer.Option("kensa-pilot", "--by", help="Who registers the candidate."),
) -> None:
    """Pilot → KPI gate → scale sweep → candidate in the MLflow registry (a Prefect flow)."""
    settings = get_settings()
    prepare_prefect(settings)
    from flows.compute import BudgetExceededError
    from flows.config import ConfigError, load_project_config
    from flows.gate import GateFailedError
    from flows.pilot import pilot

    try:
        project = load_project_config(config or settings.project_config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    try:
        summary = pilot(
            data=str(data),
            config_path=str(config) if config else None,
            seed=seed,
            continue_to_sweep=not no_sweep,
            registered_by=by,
        )
    except BudgetExceededError as exc:
        raise _fail(f"budget: {exc}") from None
    except GateFailedError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(3) from None
    gate = summary["gate"]
    console.print(
        "[green]pilot KPI gate passed[/green]: "
        + "; ".join(f"{r['kpi']} {r['achieved']} (target {r['target']})" for r in gate["rows"])
    )
    console.print(
        f"pilot MLflow run {summary['pilot_run_id']}, cost "
        f"{summary['pilot_cost']:.3f} {summary['currency']}"
    )
    if "sweep" in summary:
        s = summary["sweep"]
        print_sweep(s, project.currency)
        console.print(
            f"[bold]candidate[/bold]: {s['model_name']} version {s['model_version']} "
            f"({s['chosen']['key']}); MLflow sweep run {s['sweep_run_id']}"
        )
        console.print(f"plots: {s['scaling_plot']}  {s['frontier_plot']}")
        console.print(f"approve with: kensa approve {s['model_version']} --by NAME --reason TEXT")


def _policy(config: Path | None) -> Any:
    from flows.config import load_project_config

    settings = get_settings()
    return load_project_config(config or settings.project_config)


def approve_cmd(
    version: str = typer.Argument(..., help="Model version to promote to champion."),
    by: str = typer.Option(..., "--by", help="Who approves (recorded in the audit log)."),
    reason: str = typer.Option(..., "--reason"),
    role: str = typer.Option("admin", "--role", help="The approver's role."),
    name: str | None = typer.Option(None, "--name", help="Registered model name."),
    config: Path | None = typer.Option(None, "--config"),
) -> None:
    """Approve a candidate: it becomes the champion that serving hot-swaps to."""
    from flows.registry import ApprovalError, approve
    from flows.tracking import configure_mlflow

    settings = get_settings()
    configure_mlflow(settings)
    project = _policy(config)
    model = name or project.name
    try:
        previous = approve(
            model,
            version,
            by=by,
            role=role,
            reason=reason,
            policy=project.approval,
            settings=settings,
        )
    except ApprovalError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"[green]{model} version {version} is now champion[/green]"
        + (f" (was {previous})" if previous else "")
    )


def reject_cmd(
    version: str = typer.Argument(...),
    by: str = typer.Option(..., "--by"),
    reason: str = typer.Option(..., "--reason"),
    role: str = typer.Option("admin", "--role"),
    name: str | None = typer.Option(None, "--name"),
    config: Path | None = typer.Option(None, "--config"),
) -> None:
    """Reject a candidate (kept for the record; never gets an alias)."""
    from flows.registry import ApprovalError, reject
    from flows.tracking import configure_mlflow

    settings = get_settings()
    configure_mlflow(settings)
    project = _policy(config)
    try:
        reject(
            name or project.name,
            version,
            by=by,
            role=role,
            reason=reason,
            policy=project.approval,
            settings=settings,
        )
    except ApprovalError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{name or project.name} version {version} rejected")


def rollback_cmd(
    by: str = typer.Option(..., "--by"),
    reason: str = typer.Option(..., "--reason"),
    role: str = typer.Option("admin", "--role"),
    name: str | None = typer.Option(None, "--name"),
    config: Path | None = typer.Option(None, "--config"),
) -> None:
    """Return the champion alias to the version it replaced."""
    from flows.registry import ApprovalError, rollback
    from flows.tracking import configure_mlflow

    settings = get_settings()
    configure_mlflow(settings)
    project = _policy(config)
    try:
        old, new = rollback(
            name or project.name,
            by=by,
            role=role,
            reason=reason,
            policy=project.approval,
            settings=settings,
        )
    except ApprovalError as exc:
        raise _fail(str(exc)) from None
    console.print(f"champion rolled back from version {old} to {new}")


def cost_cmd(
    version: str | None = typer.Option(None, "--version", help="Only this model version."),
) -> None:
    """Print the cost ledger: device-hours and cost per run, stage, target and model version."""
    from flows.ledger import read_ledger

    lines = read_ledger(get_settings(), version)
    table = Table(title="cost ledger")
    for col in ("when", "run", "stage", "target", "model version", "device-hours", "cost"):
        table.add_column(col, justify="right")
    totals: dict[str, float] = {}
    for line in lines:
        table.add_row(
            line.created_at.strftime("%Y-%m-%d %H:%M") if line.created_at else "",
            line.run_id[:8],
            line.stage,
            line.target,
            line.model_version or "-",
            f"{line.device_hours:.4f}",
            f"{line.cost:.3f} {line.currency}",
        )
        totals[line.currency] = totals.get(line.currency, 0.0) + line.cost
    console.print(table)
    for currency, total in totals.items():
        console.print(f"total: {total:.3f} {currency}")
