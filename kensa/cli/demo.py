"""`kensa demo`: the whole loop on the embedded default, one stage after another, as users run it.

line → pilot → KPI gate → sweep → candidate → approval (as ``demo-operator``) → serving on
127.0.0.1 → the simulated line streams parts → a lighting drift begins → drift check: alert,
review sample, retraining candidate → escalation through a signed webhook → summary.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from kensa.cli.common import ExitCode, console, get_settings

OPERATOR = "demo-operator"
DATA_SCIENTIST = "demo-data-scientist"


def _run(args: list[str], allow: tuple[int, ...] = (ExitCode.OK,)) -> int:
    """Run one kensa command in this process, exactly as typed on the command line."""
    from kensa.cli.main import app

    console.print(Rule(f"[bold]kensa {escape(' '.join(args))}"))
    command = typer.main.get_command(app)
    try:
        # Without standalone mode click returns a command's exit code instead of exiting.
        result = command.main(args=args, prog_name="kensa", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except (click.exceptions.Exit, typer.Exit) as exc:
        code = int(getattr(exc, "exit_code", ExitCode.FAILURE) or 0)
    if code not in allow:
        console.print(f"[red]kensa {escape(args[0])} failed (exit {code}); the demo stops here[/red]")
        raise typer.Exit(code)
    return code


def _configure(config: Path, webhook_url: str, webhook_secret: str) -> None:
    """Settings for this demo: its project config for every stage (the retraining flow and the
    server read it too, not only the pilot), the webhook receiver, quick escalation."""
    defaults = {
        "KENSA_PROJECT_CONFIG": str(config.resolve()),
        "KENSA_WEBHOOK_URL": webhook_url,
        "KENSA_WEBHOOK_SECRET": webhook_secret,
        # An unacknowledged critical alert pages someone after 20 s in the demo (not an hour).
        "KENSA_ESCALATE_AFTER_S": "20",
        "KENSA_SESSION_SECRET": os.environ.get("KENSA_SESSION_SECRET") or secrets.token_hex(32),
        "KENSA_CHAMPION_POLL_S": "2",
    }
    os.environ.update(defaults)
    get_settings.cache_clear()


def _versions(name: str) -> dict[str, str | None]:
    from mlflow.tracking import MlflowClient

    from kensa.registry import ALIAS_CANDIDATE, ALIAS_CHAMPION

    uri = get_settings().resolved_mlflow_uri
    client = MlflowClient(uri, uri)
    out: dict[str, str | None] = {}
    for alias in (ALIAS_CHAMPION, ALIAS_CANDIDATE):
        try:
            out[alias] = str(client.get_model_version_by_alias(name, alias).version)
        except Exception:  # no such alias yet
            out[alias] = None
    return out


def _retraining(candidate: str | None, runs: list[str]) -> str:
    """What the retraining gave: a candidate, or why not (it must pass the same KPI gate)."""
    if candidate:
        return f"candidate v{candidate}, waiting for a person's approval"
    if not runs:
        return "not started"
    try:
        from uuid import UUID

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(runs[0])).state
        why = (state.message or "") if state is not None else ""
    except Exception:  # noqa: BLE001 - the summary never fails the demo
        why = ""
    why = why.rsplit("Error: ", 1)[-1].strip()
    return "ran, no candidate" + (f": {why[:110]}" if why else "")


def _store_figures(since: Any) -> dict[str, Any]:
    from sqlalchemy import func, select

    from kensa.store.connect import open_store
    from kensa.store.models import Alert, Prediction, ReviewItem

    with open_store(get_settings())() as s:
        verdicts = dict(
            s.execute(
                select(Prediction.verdict, func.count()).where(Prediction.created_at >= since)
                .group_by(Prediction.verdict)
            ).all()
        )  # fmt: skip
        alerts = s.scalars(select(Alert).where(Alert.created_at >= since).order_by(Alert.id)).all()
        reviews = dict(
            s.execute(
                select(ReviewItem.reason, func.count()).where(ReviewItem.created_at >= since)
                .group_by(ReviewItem.reason)
            ).all()
        )  # fmt: skip
        return {
            "verdicts": verdicts,
            "alerts": [(a.id, a.level, a.kind, a.status, a.cause) for a in alerts],
            "retrain_runs": sorted(
                {str(a.details["retrain_run"]) for a in alerts if (a.details or {}).get("retrain_run")}
            ),  # fmt: skip
            "reviews": reviews,
        }


def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo writes.")] = Path(".kensa/demo"),
    n: Annotated[int, typer.Option("--n", help="Parts the synthetic line makes for training.")] = 2000,
    image_size: Annotated[int, typer.Option("--image-size", help="Part image side in px.")] = 128,
    config: Annotated[Path, typer.Option("--config", help="Project config.")] = Path("examples/kensa.toml"),
    clean_parts: Annotated[int, typer.Option("--clean-parts", help="Parts streamed before the drift.")] = 600,
    drift_parts: Annotated[int, typer.Option("--drift-parts", help="Parts streamed after it begins.")] = 600,
    shift: Annotated[str, typer.Option("--shift", help="The line condition that drifts.")] = "lighting=0.55",
    up: Annotated[
        bool, typer.Option("--up", help="Keep serving (and the console) running at the end.")
    ] = False,
) -> None:
    """The whole loop: line → pilot → gate → sweep → approval → serving → drift → alert → retraining."""
    from datetime import UTC, datetime

    from kensa.cli.demo_support import ServedProcess, WebhookReceiver, free_port, make_key

    t0, started = time.perf_counter(), datetime.now(UTC)
    marks: dict[str, float] = {}
    receiver = WebhookReceiver(secret=secrets.token_hex(16)).start()
    _configure(config, receiver.url, receiver.secret)
    settings = get_settings()
    settings.ensure_dirs()
    from kensa.flows.config import load_project_config

    name = load_project_config(config).name

    data = out / "line"
    if not (data / ".kensa-dataset.json").exists():
        _run(["line", "generate", "--out", str(data), "--n", str(n), "--seed", "0",
              "--image-size", str(image_size)])  # fmt: skip
        _run(["data", "ingest", str(data)])
    marks["line"] = time.perf_counter() - t0

    gate = _run(["pilot", "--data", str(data), "--config", str(config), "--by", DATA_SCIENTIST],
                allow=(ExitCode.OK, ExitCode.GATE))  # fmt: skip
    marks["pilot → sweep"] = time.perf_counter() - t0
    if gate == ExitCode.GATE:
        # `kensa pilot` exits 3 when the KPI gate stops the flow: a result to show, not a crash.
        console.print("The pilot missed its KPI: the flow stopped before any scale spend (see above).")
        raise typer.Exit(ExitCode.GATE)
    candidate = _versions(name)["candidate"]
    assert candidate is not None, "the sweep registers a candidate when the gate passes"
    _run(["approve", candidate, "--by", OPERATOR, "--role", "operator", "--config", str(config),
          "--reason", "demo: KPI met on clean and corrupted parts"])  # fmt: skip
    marks["approval"] = time.perf_counter() - t0

    line_key = make_key(settings, "line", "demo line camera")
    operator_key = make_key(settings, "operator", OPERATOR)
    port = free_port()
    console.print(Rule(f"[bold]kensa serve --registry-name {name} --port {port}"))
    served = ServedProcess(port, name, out / "serve.log", env={})
    try:
        served.wait_ready()
        console.print(f"serving champion v{candidate} at {served.url}")
        _run(["line", "stream", "--url", served.url, "--key", line_key, "--n", str(clean_parts + drift_parts),
              "--shift", shift, "--shift-at", str(clean_parts), "--seed", "1",
              "--image-size", str(image_size)])  # fmt: skip
        marks["stream"] = time.perf_counter() - t0
        _run(["drift", "check"])
        marks["drift check + retraining"] = time.perf_counter() - t0
        # Nobody acknowledged the critical alert: after KENSA_ESCALATE_AFTER_S the next check pages.
        # Its clock started when the check opened it, near the check's end, so wait all of it.
        wait = settings.escalate_after_s + 1
        console.print(f"waiting {wait:.0f} s: nobody acknowledges the critical alert…")
        time.sleep(wait)
        _run(["drift", "check", "--no-retrain"])
        marks["escalation"] = time.perf_counter() - t0
        _summary(name, candidate, started, receiver, marks, time.perf_counter() - t0)
        _where_to_look(served.url, operator_key, settings)
        if up:
            console.print("[bold]serving and the console stay up; Ctrl-C stops them[/bold]")
            served.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        served.stop()
        receiver.stop()


def _summary(
    name: str, approved: str, since: Any, receiver: Any, marks: dict[str, float], total: float
) -> None:
    figures = _store_figures(since)
    versions = _versions(name)
    console.print(Rule("[bold]what happened"))
    table = Table(title=f"kensa demo: the whole loop in {total / 60:.1f} min")
    table.add_column("step")
    table.add_column("result")
    table.add_column("done at", justify="right")
    v = figures["verdicts"]
    alerts = figures["alerts"]
    critical = [a for a in alerts if a[1] == "critical"]
    webhooks = receiver.received
    rows = [
        ("line", "synthetic parts generated and ingested", "line"),
        ("pilot → gate → sweep", f"candidate v{approved} registered", "pilot → sweep"),
        ("approval", f"v{approved} approved by {OPERATOR} → champion", "approval"),
        ("serving", f"{sum(v.values())} verdicts: " + ", ".join(f"{k} {c}" for k, c in sorted(v.items())),
         "stream"),
        ("drift", f"{len(alerts)} alert(s), {len(critical)} critical: "
         + (critical[0][4][:80] if critical else "none"), "drift check + retraining"),
        ("review queue", ", ".join(f"{c} {r}" for r, c in sorted(figures["reviews"].items())) or "empty",
         "drift check + retraining"),
        ("retraining", _retraining(versions["candidate"], figures["retrain_runs"]),
         "drift check + retraining"),
        ("escalation", f"{len(webhooks)} webhook call(s), "
         f"{sum(1 for w in webhooks if w['valid'])} with a valid signature", "escalation"),
    ]  # fmt: skip
    for step, result, mark in rows:
        table.add_row(step, result, f"{marks.get(mark, 0) / 60:.1f} min")
    console.print(table)


def _where_to_look(url: str, operator_key: str, settings: Any) -> None:
    console.print(Rule("[bold]where to look"))
    console.print(f"console:   {url}/console   (sign in with the operator key below; `make demo-up`)")
    console.print(f"operator key (shown once): {operator_key}")
    console.print(f"MLflow UI: mlflow ui --backend-store-uri {settings.resolved_mlflow_uri}")
    console.print(f"Prefect:   PREFECT_HOME={settings.prefect_home} prefect server start")
    console.print("ledger:    kensa cost    alerts: kensa alerts list    audit: kensa audit export VERSION")
