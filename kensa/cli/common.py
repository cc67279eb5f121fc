"""Helpers shared by CLI subcommands: the settings object and a rich console."""

from __future__ import annotations

from functools import lru_cache

from rich.console import Console

from kensa.settings import Settings

console = Console()
err_console = Console(stderr=True)
if not console.is_terminal:
    # Piped or captured output (CI logs, `make demo | tee`): rich would wrap tables at 80 columns.
    console.width = 160
    err_console.width = 160

# Exit code for invalid user input (bad data, bad config); 1 stays for unexpected failures.
EXIT_INVALID = 2


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Build the one Settings object for this CLI process."""
    return Settings()
