"""``kensa serve``: the inference service (a model file, or the registry's champion)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from kensa.cli.common import EXIT_INVALID, err_console, get_settings

app = typer.Typer(help="The inference service.")


@app.command()
def serve(
    model: Path | None = typer.Option(
        None,
        "--model",
        help="Serve this kensa ONNX file (no registry); version 'file:<sha256[:12]>'.",
    ),
    registry_name: str | None = typer.Option(
        None,
        "--registry-name",
        help="Follow the 'champion' alias of this registered model (default: KENSA_REGISTRY_NAME).",
    ),
    host: str | None = typer.Option(None, "--host", help="Listen address (default: KENSA_HOST)."),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Listen port (default: KENSA_PORT)."
    ),
) -> None:
    """Serve verdicts over HTTP: /v1/inspect, the Open Inference Protocol v2, /metrics."""
    if model is not None and registry_name is not None:
        err_console.print("[red]give either --model or --registry-name, not both[/red]")
        raise typer.Exit(EXIT_INVALID)
    if model is not None and not model.is_file():
        err_console.print(f"[red]model file not found:[/red] {escape(str(model))}")
        raise typer.Exit(EXIT_INVALID)
    settings = get_settings()
    updates: dict[str, object] = {}
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    if updates:
        settings = settings.model_copy(update=updates)
    from kensa.serving.server import serve as run_server  # imported here: keeps `kensa --help` fast

    run_server(settings, model_file=model, registry_name=registry_name)


if __name__ == "__main__":  # `python -m kensa.cli.serve` (used by tests until main.py wires it)
    app()
