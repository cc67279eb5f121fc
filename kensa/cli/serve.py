"""``kensa serve``: the inference service (a model file, or the registry's champion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kensa.cli.common import fail, get_settings

app = typer.Typer(help="The inference service.")


@app.command()
def serve(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", help="Serve this kensa ONNX file (no registry); version 'file:<sha256[:12]>'."
        ),
    ] = None,
    registry_name: Annotated[
        str | None,
        typer.Option(
            "--registry-name",
            help="Follow the 'champion' alias of this registered model (default: KENSA_REGISTRY_NAME).",
        ),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (default: KENSA_HOST).")] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help="Listen port (default: KENSA_PORT).")
    ] = None,
) -> None:
    """Serve verdicts over HTTP: /v1/inspect, the Open Inference Protocol v2, /metrics."""
    if model is not None and registry_name is not None:
        raise fail("give either --model or --registry-name, not both")
    if model is not None and not model.is_file():
        raise fail(f"model file not found: {model}")
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
