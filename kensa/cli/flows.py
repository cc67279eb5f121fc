"""`kensa pilot`, `approve`, `reject`, `rollback`, `cost`: thin commands over flows/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import ExitCode, JsonOpt, Role, console, fail, get_settings, print_json
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
            escape(("→ " if t["key"] == chosen else "") + t["key"]),
            escape(t["target"]),
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
    data: Annotated[Path, typer.Option("--data", help="Ingested dataset folder.")],
    config: Annotated[Path | None, typer.Option("--config", help="kensa.toml (default: built-in).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    no_sweep: Annotated[bool, typer.Option("--no-sweep", help="Stop after the pilot's KPI gate.")] = False,
    by: Annotated[str, typer.Option("--by", help="Who registers the candidate.")] = "kensa-pilot",
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
        raise fail(str(exc)) from None
    try:
        summary = pilot(
            data=str(data),
            config_path=str(config) if config else None,
            seed=seed,
            continue_to_sweep=not no_sweep,
            registered_by=by,
        )
    except BudgetExceededError as exc:
        raise fail(f"budget: {exc}") from None
    except GateFailedError as exc:
        raise fail(str(exc), ExitCode.GATE) from None
    gate = summary["gate"]
    console.print(
        "[green]pilot KPI gate passed[/green]: "
        + escape("; ".join(f"{r['kpi']} {r['achieved']} (target {r['target']})" for r in gate["rows"]))
    )
    console.print(
        escape(
            f"pilot MLflow run {summary['pilot_run_id']}, "
            f"cost {summary['pilot_cost']:.3f} {summary['currency']}"
        )
    )
    if "sweep" in summary:
        s = summary["sweep"]
        print_sweep(s, project.currency)
        console.print(
            "[bold]candidate[/bold]: "
            + escape(
                f"{s['model_name']} version {s['model_version']} "
                f"({s['chosen']['key']}); MLflow sweep run {s['sweep_run_id']}"
            )
        )
        console.print(escape(f"plots: {s['scaling_plot']}  {s['frontier_plot']}"))
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
        raise fail(str(exc)) from None
    configure_mlflow(settings)
    model = name or project.name
    try:
        return model, getattr(registry, action)(model, policy=project.approval, settings=settings, **kwargs)
    except registry.ApprovalError as exc:
        raise fail(str(exc)) from None
    except mlflow.exceptions.MlflowException as exc:
        # An unknown model or version: say which, without MLflow's internals.
        raise fail(f"{model} {kwargs.get('version', '')}: {exc.message.splitlines()[0]}") from None


VersionArg = Annotated[str, typer.Argument(help="Model version in the registry.")]
ByOpt = Annotated[str, typer.Option("--by", help="Who decides (recorded in the audit log).")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")]
RoleOpt = Annotated[Role, typer.Option("--role", help="The decider's role, checked against the policy.")]
NameOpt = Annotated[
    str | None, typer.Option("--name", help="Registered model name (default: the project's).")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="kensa.toml with the approval policy.")]


def approve_cmd(
    version: VersionArg,
    by: ByOpt,
    reason: ReasonOpt,
    role: RoleOpt = Role.ADMIN,
    name: NameOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Approve a candidate: it becomes the champion that serving hot-swaps to."""
    model, previous = _registry_call(
        "approve", name, config, version=version, by=by, role=role.value, reason=reason
    )
    was = f" (was {previous})" if previous else ""
    console.print(f"[green]{escape(f'{model} version {version} is now champion')}[/green]{escape(was)}")


def reject_cmd(
    version: VersionArg,
    by: ByOpt,
    reason: ReasonOpt,
    role: RoleOpt = Role.ADMIN,
    name: NameOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Reject a candidate (kept for the record; never gets an alias)."""
    model, _ = _registry_call("reject", name, config, version=version, by=by, role=role.value, reason=reason)
    console.print(escape(f"{model} version {version} rejected"))


def rollback_cmd(
    by: ByOpt,
    reason: ReasonOpt,
    role: RoleOpt = Role.ADMIN,
    name: NameOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Return the champion alias to the version it replaced."""
    _, (old, new) = _registry_call("rollback", name, config, by=by, role=role.value, reason=reason)
    console.print(escape(f"champion rolled back from version {old} to {new}"))


def cost_cmd(
    version: Annotated[str | None, typer.Option("--version", help="Only this model version.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the cost ledger: device-hours and cost per run, stage, target and model version."""
    from kensa.flows.ledger import read_ledger

    lines = read_ledger(get_settings(), version)
    totals: dict[str, float] = {}
    for line in lines:
        totals[line.currency] = totals.get(line.currency, 0.0) + line.cost
    if as_json:
        print_json(
            {
                "lines": [
                    {
                        "created_at": line.created_at.isoformat() if line.created_at else None,
                        "run_id": line.run_id,
                        "stage": line.stage,
                        "target": line.target,
                        "model_version": line.model_version,
                        "device_hours": line.device_hours,
                        "cost": line.cost,
                        "currency": line.currency,
                    }
                    for line in lines
                ],
                "totals": totals,
            }
        )
        return
    table = Table(title="cost ledger")
    for col in ("when", "run", "stage", "target", "model version", "device-hours", "cost"):
        table.add_column(col, justify="right")
    for line in lines:
        table.add_row(
            line.created_at.strftime("%Y-%m-%d %H:%M") if line.created_at else "",
            escape(line.run_id[:8]),
            escape(line.stage),
            escape(line.target),
            escape(line.model_version or "-"),
            f"{line.device_hours:.4f}",
            escape(f"{line.cost:.3f} {line.currency}"),
        )
    console.print(table)
    for currency, total in totals.items():
        console.print(escape(f"total: {total:.3f} {currency}"))
