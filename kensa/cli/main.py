"""Root of the ``kensa`` command; subcommands import their part lazily so ``--help`` stays fast."""

from __future__ import annotations

from typing import Annotated

import typer

from kensa.cli import audit, backbones, data, db, demo, deploy, flows, keys, line, modeling, serve
from kensa.cli import drift_alerts as monitor_cmds
from kensa.cli import experiments as experiment_cmds
from kensa.cli import retrain as retrain_cmds

app = typer.Typer(
    name="kensa",
    help="Visual quality control: pilot, KPI gate, scale sweep, approval, serving, monitoring.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from kensa import __version__

        typer.echo(f"kensa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print kensa's version and exit."
        ),
    ] = False,
) -> None:
    """Visual quality control: pilot, KPI gate, scale sweep, approval, serving, monitoring."""
    from kensa.cli.common import get_settings
    from kensa.logs import configure_logging

    # Warnings from any part come out as structured lines (JSON by default); a command's own
    # output is rich text on stdout. `kensa serve` re-configures at the settings' log level.
    # Invalid settings exit 2 here, naming each one, before any command starts.
    configure_logging("WARNING", get_settings().log_format)


app.add_typer(line.app, name="line")
app.add_typer(data.app, name="data")
app.add_typer(db.app, name="db")
app.command("train")(modeling.train_cmd)
app.command("evaluate")(modeling.evaluate_cmd)
app.command("export")(modeling.export_cmd)
app.command("demo")(demo.demo)
app.command("pilot")(flows.pilot_cmd)
app.command("approve")(flows.approve_cmd)
app.command("reject")(flows.reject_cmd)
app.command("rollback")(flows.rollback_cmd)
app.command("cost")(flows.cost_cmd)
app.command("retrain")(retrain_cmds.retrain_cmd)
app.command("deploy")(deploy.deploy_cmd)
app.add_typer(keys.app, name="keys")
app.add_typer(backbones.app, name="backbones")
app.add_typer(audit.app, name="audit")
app.command("register")(experiment_cmds.register_cmd)
app.command("compare")(experiment_cmds.compare_cmd)
app.command("recalibrate")(experiment_cmds.recalibrate_cmd)
app.command("serve")(serve.serve)
app.add_typer(monitor_cmds.drift_app, name="drift")
app.add_typer(monitor_cmds.alerts_app, name="alerts")


if __name__ == "__main__":  # pragma: no cover
    app()
