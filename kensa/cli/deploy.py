"""`kensa deploy`: the work pools and deployments of ``infra/prefect.yaml`` on a Prefect server.

Pools through Prefect's client, deployments by ``prefect deploy --all`` (``kensa.flows.deploy``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import EXIT_INVALID, console, err_console, get_settings

_STYLE = {"created": "green", "updated": "cyan", "unchanged": "dim"}


def _api_url(url: str) -> str:
    """Prefect's API lives under ``/api``; accept the server's bare address as well."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--api-url must be an http(s) URL such as http://127.0.0.1:4200/api; got {url!r}")
    return url.rstrip("/") if parts.path.rstrip("/") else url.rstrip("/") + "/api"


def deploy_cmd(
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api-url",
            help="Prefect server API, e.g. http://127.0.0.1:4200/api (default: KENSA_PREFECT_API_URL).",
        ),
    ] = None,
    prefect_yaml: Annotated[
        Path | None,
        typer.Option(
            "--prefect-yaml",
            help="Deployments and work pools to create (default: infra/prefect.yaml in --repo-dir, "
            "else here).",
        ),
    ] = None,
    repo_dir: Annotated[
        Path | None,
        typer.Option(
            "--repo-dir",
            help="Checkout `prefect deploy` runs in and the on-prem process worker runs flows from "
            "(default: the folder holding the prefect.yaml's infra/).",
        ),
    ] = None,
) -> None:
    """Create or update the work pools and deployments of prefect.yaml on a Prefect server.

    Pools through Prefect's client, deployments by `prefect deploy --all`; idempotent.
    """
    settings = get_settings()
    url = api_url or settings.prefect_api_url
    if not url:
        err_console.print(
            "[red]error:[/red] kensa deploy needs a Prefect server: pass --api-url "
            "http://HOST:4200/api or set KENSA_PREFECT_API_URL (the embedded "
            "ephemeral API forgets deployments when the command ends)"
        )
        raise typer.Exit(EXIT_INVALID)
    try:
        url = _api_url(url)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_INVALID) from None
    from kensa.cli.flows import prepare_prefect

    prepare_prefect(settings)
    from kensa.flows.deploy import DeployConfigError, DeployError, PrefectUnreachableError, deploy

    try:
        applied = deploy(prefect_yaml or (repo_dir or Path()) / "infra" / "prefect.yaml", url, repo_dir)
    except (DeployConfigError, PrefectUnreachableError) as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_INVALID) from None
    except DeployError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None

    table = Table(title=f"Prefect at {url}")
    for col in ("kind", "name", "action", "detail"):
        table.add_column(col)
    for item in applied:
        style = _STYLE.get(item.action, "")
        table.add_row(item.kind, item.name, f"[{style}]{item.action}[/{style}]", item.detail)
    console.print(table)


if __name__ == "__main__":  # pragma: no cover - `python -m kensa.cli.deploy` before main.py has it
    typer.run(deploy_cmd)
