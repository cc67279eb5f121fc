"""What every CLI subcommand shares: settings, consoles, exit codes, choices, errors and JSON output."""

from __future__ import annotations

import json
import sys
from enum import IntEnum, StrEnum
from functools import lru_cache
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from kensa.settings import Settings

console = Console()
err_console = Console(stderr=True)
if not console.is_terminal:
    # Piped or captured output (CI logs, `make demo | tee`): rich would wrap tables at 80 columns.
    console.width = 160
    err_console.width = 160


class ExitCode(IntEnum):
    """The one table of ``kensa`` exit codes (docs/cli.md); no command exits with a bare number."""

    OK = 0
    # Something went wrong that the input did not cause: a flow that failed, parts the service
    # did not judge, a file that could not be written. An uncaught exception also exits 1.
    FAILURE = 1
    # Bad input: a usage error (as click reports it), invalid data or config, a request refused
    # (unknown version, a role the policy does not allow, an alert already resolved).
    INVALID = 2
    # The command ran and its check said no: a KPI gate missed, an audit bundle that fails
    # verification, an ONNX export that fails parity, a store behind the newest schema (--check).
    GATE = 3
    # A service the command needs could not be reached (the store, the inference service).
    UNAVAILABLE = 4


# Kept for callers that predate ExitCode.
EXIT_INVALID = ExitCode.INVALID


class Role(StrEnum):
    """API key and approval roles; the same values as ``kensa.store.models.ROLES``.

    Spelled out here, not imported: the store's models pull in SQLAlchemy, too slow for ``--help``.
    """

    LINE = "line"
    OPERATOR = "operator"
    DATA_SCIENTIST = "data-scientist"
    AUDITOR = "auditor"
    ADMIN = "admin"


def fail(message: str, code: ExitCode = ExitCode.INVALID) -> typer.Exit:
    """Print ``error: message`` on stderr (markup-safe) and return the Exit to raise.

    ``raise fail(...) from None``: a user sees the message, never a traceback.
    """
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr, markup-safe."""
    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True, highlight=False)


def print_json(data: Any) -> None:
    """Write ``data`` to stdout as JSON and nothing else: no markup, highlighting or wrapping."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


# `--json` on every command that reads and prints: declared once so they all say the same.
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON on stdout (and nothing else) instead of a table.")
]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Build the one Settings object for this CLI process; invalid settings exit 2, naming each."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"KENSA_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise fail(f"invalid settings: {problems}") from None
