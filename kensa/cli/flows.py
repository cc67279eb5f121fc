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
    from kensa.flows.compute import BudgetExceededError
    from kensa.flows.config import ConfigError, load_project_config
    from kensa.flows.gate import GateFailedError
    from kensa.flows.pilot import pilot

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
        f"pilot MLflow run {summary['pilot_run_id']}, cost {summary['pilot_cost']:.3f} {summary['currency']}"
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


def _registry_call(action: str, name: str | None, config: Path | None, **kwargs: Any) -> Any:
    """Run one registry action under the project's approval policy; refusals exit with code 2."""
    import mlflow

    from kensa.flows import register as registry
    from kensa.flows.config import ConfigError, load_project_config
    from kensa.flows.tracking import configure_mlflow

    settings = get_settings()
    try:
        project = load_project_config(config or settings.project_config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    configure_mlflow(settings)
    model = name or project.name
    try:
        return model, getattr(registry, action)(model, policy=project.approval, settings=settings, **kwargs)
    except registry.ApprovalError as exc:
        raise _fail(str(exc)) from None
    except mlflow.exceptions.MlflowException as exc:
        # An unknown model or version: say which, without MLflow's internals.
        raise _fail(f"{model} {kwargs.get('version', '')}: {exc.message.splitlines()[0]}") from None


VersionArg = typer.Argument(..., help="Model version in the registry.")
ByOpt = typer.Option(..., "--by", help="Who decides (recorded in the audit log).")
ReasonOpt = typer.Option(..., "--reason", help="Why (recorded in the audit log).")
RoleOpt = typer.Option("admin", "--role", help="The decider's role, checked against the policy.")
NameOpt = typer.Option(None, "--name", help="Registered model name (default: the project's).")
ConfigOpt = typer.Option(None, "--config", help="kensa.toml with the approval policy.")


def approve_cmd(
    version: str = VersionArg,
    by: str = ByOpt,
    reason: str = ReasonOpt,
    role: str = RoleOpt,
    name: str | None = NameOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Approve a candidate: it becomes the champion that serving hot-swaps to."""
    model, previous = _registry_call(
        "approve", name, config, version=version, by=by, role=role, reason=reason
    )
    was = f" (was {previous})" if previous else ""
    console.print(f"[green]{model} version {version} is now champion[/green]{was}")


def reject_cmd(
    version: str = VersionArg,
    by: str = ByOpt,
    reason: str = ReasonOpt,
    role: str = RoleOpt,
    name: str | None = NameOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Reject a candidate (kept for the record; never gets an alias)."""
    model, _ = _registry_call("reject", name, config, version=version, by=by, role=role, reason=reason)
    console.print(f"{model} version {version} rejected")


def rollback_cmd(
    by: str = ByOpt,
    reason: str = ReasonOpt,
    role: str = RoleOpt,
    name: str | None = NameOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Return the champion alias to the version it replaced."""
    _, (old, new) = _registry_call("rollback", name, config, by=by, role=role, reason=reason)
    console.print(f"champion rolled back from version {old} to {new}")


def cost_cmd(
    version: str | None = typer.Option(None, "--version", help="Only this model version."),
) -> None:
    """Print the cost ledger: device-hours and cost per run, stage, target and model version."""
    from kensa.flows.ledger import read_ledger

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
