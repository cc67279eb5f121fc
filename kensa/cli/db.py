"""``kensa db``: create and upgrade the store's schema, and show which revision it is at."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from kensa.cli.common import EXIT_INVALID, console, err_console, get_settings

if TYPE_CHECKING:
    from sqlalchemy.exc import OperationalError

app = typer.Typer(help="The SQL store: schema migrations.", no_args_is_help=True)


def _print_unreachable(shown_url: str, exc: OperationalError) -> None:
    err_console.print(f"[red]cannot reach the store at {escape(shown_url)}:[/red] {escape(str(exc.orig))}")


def _revision_label(revision: str | None) -> str:
    return revision if revision is not None else "none (empty store)"


@app.command()
def upgrade(
    revision: str = typer.Option(
        "head", "--revision", "-r", help="Target revision; 'head' is the newest shipped."
    ),
) -> None:
    """Create the store or migrate it to the newest schema (safe to run again)."""
    # Imported here: SQLAlchemy and Alembic are too slow to load for `kensa --help`.
    from alembic.util import CommandError
    from sqlalchemy.exc import OperationalError

    from kensa.store.engine import StoreURLError, display_url
    from kensa.store.migrate import head_revision
    from kensa.store.migrate import upgrade as upgrade_store

    url = get_settings().resolved_store_url
    try:
        shown_url = display_url(url)
        change = upgrade_store(url, revision)
    except StoreURLError as exc:
        err_console.print(f"[red]invalid KENSA_STORE_URL:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from exc
    except CommandError as exc:
        target = escape(repr(revision))
        err_console.print(f"[red]cannot upgrade to revision {target}:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from exc
    except OperationalError as exc:
        _print_unreachable(shown_url, exc)
        raise typer.Exit(1) from exc

    console.print(f"store     {escape(shown_url)}")
    console.print(f"before    {_revision_label(change.before)}")
    console.print(f"after     {_revision_label(change.after)}")
    if not change.changed:
        console.print("[green]already up to date[/green]")
    elif change.after == head_revision():
        console.print("[green]upgraded to the newest schema[/green]")
    else:
        console.print(f"[green]upgraded to {change.after}[/green]")


@app.command()
def current(
    check: bool = typer.Option(
        False, "--check", help="Exit with status 1 unless the store is at the newest revision."
    ),
) -> None:
    """Show the store's schema revision and the newest one this kensa ships."""
    from sqlalchemy.exc import OperationalError

    from kensa.store.engine import StoreURLError, display_url
    from kensa.store.migrate import current_revision, head_revision

    url = get_settings().resolved_store_url
    try:
        shown_url = display_url(url)
        revision = current_revision(url)
    except StoreURLError as exc:
        err_console.print(f"[red]invalid KENSA_STORE_URL:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from exc
    except OperationalError as exc:
        _print_unreachable(shown_url, exc)
        raise typer.Exit(1) from exc

    head = head_revision()
    console.print(f"store     {escape(shown_url)}")
    console.print(f"current   {_revision_label(revision)}")
    console.print(f"newest    {head}")
    if revision != head:
        console.print("[yellow]behind: run `kensa db upgrade`[/yellow]")
        if check:
            raise typer.Exit(1)
