"""`kensa retrain`: start the retraining flow by hand (the drift flow starts it on critical drift)."""

from __future__ import annotations

import json
from typing import Annotated
from uuid import UUID

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import ExitCode, console, fail, get_settings
from kensa.settings import Settings


def retrain_cmd(
    alert: Annotated[int | None, typer.Option("--alert", help="The alert this retraining answers.")] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept on the run).")] = "operator request",
) -> None:
    """Retrain on the champion's data plus the review queue's labels; register a candidate.

    Runs through the `retrain` deployment when KENSA_PREFECT_API_URL names a Prefect server that
    has it (a worker picks it up), otherwise here. Never promotes: approve with `kensa approve`.
    """
    settings = get_settings()
    from kensa.cli.flows import prepare_prefect

    prepare_prefect(settings)
    from kensa.flows.retrain import start_retraining

    flow_run_id = start_retraining(settings, alert_id=alert, reason=reason)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
    state = run.state
    if state is not None and not state.is_final():
        console.print(
            escape(
                f"retraining scheduled on the Prefect server: flow run {flow_run_id} "
                f"({state.type.value.lower()}); a worker on pool {run.work_pool_name} runs it"
            )
        )
        return
    if state is None or not state.is_completed():
        message = state.message if state is not None else "no state"
        raise fail(f"retraining failed (flow run {flow_run_id}): {message or ''}", ExitCode.FAILURE)
    _print_candidate(settings, flow_run_id)


def _print_candidate(settings: Settings, flow_run_id: str) -> None:
    from kensa.flows.config import load_project_config
    from kensa.flows.retrain import TAG_COMPARISON, TAG_PREFIX
    from kensa.flows.tracking import configure_mlflow

    client = configure_mlflow(settings)
    name = load_project_config(settings.project_config).name
    found = client.search_model_versions(
        f"name = '{name}' and tags.`{TAG_PREFIX}flow_run_id` = '{flow_run_id}'"
    )
    if not found:
        console.print(f"retraining flow run {flow_run_id} completed")
        return
    mv = found[0]
    comparison = json.loads(mv.tags.get(TAG_COMPARISON, "{}"))
    table = Table(
        title=escape(
            f"candidate {name} version {mv.version} vs champion "
            f"{mv.tags.get(TAG_PREFIX + 'champion_version')}"
        )
    )
    for col in ("parts", "model", "escape", "false reject", "automation", "accuracy"):
        table.add_column(col, justify="right" if col != "parts" else "left")
    for set_name, entry in comparison.items():
        for model in ("champion", "candidate"):
            m = entry.get(model, {})
            table.add_row(
                escape(f"{set_name} ({entry.get('n', 0)})"),
                model,
                *(
                    f"{m.get(k, 0):.1%}"
                    for k in ("escape_rate", "false_reject_rate", "automation_rate", "accuracy")
                ),
            )
    console.print(table)
    console.print(
        f"{mv.tags.get(TAG_PREFIX + 'new_labels', '0')} new review labels; approve with: "
        f"kensa approve {mv.version} --by NAME --reason TEXT"
    )
