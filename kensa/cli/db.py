"""``kensa db``: create and upgrade the store's schema, and show which revision it is at."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from kensa.cli.common import ExitCode, JsonOpt, console, fail, get_settings, print_json

if TYPE_CHECKING:
    from sqlalchemy.exc import OperationalError

app = typer.Typer(help="The SQL store: schema migrations.", no_args_is_help=True)


def _unreachable(shown_url: str, exc: OperationalError) -> typer.Exit:
    return fail(f"cannot reach the store at {shown_url}: {exc.orig}", ExitCode.UNAVAILABLE)


def _revision_label(revision: str | None) -> str:
    return revision if revision is not None else "none (empty store)"


@app.command()
def upgrade(
    revision: Annotated[
        str, typer.Option("--revision", "-r", help="Target revision; 'head' is the newest shipped.")
    ] = "head",
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
        raise fail(f"invalid KENSA_STORE_URL: {exc}") from exc
    except CommandError as exc:
        raise fail(f"cannot upgrade to revision {revision!r}: {exc}") from exc
    except OperationalError as exc:
        raise _unreachable(shown_url, exc) from exc

    console.print(f"store     {escape(shown_url)}")
    console.print(f"before    {_revision_label(change.before)}")
    console.print(f"after     {_revision_label(change.after)}")
    if not change.changed:
        console.print("[green]already up to date[/green]")
    elif change.after == head_revision():
        console.print("[green]upgraded to the newest schema[/green]")
    else:
        console.print(f"[green]upgraded to {escape(str(change.after))}[/green]")


@app.command()
def current(
    check: Annotated[
        bool,
        typer.Option("--check", help="Exit with status 3 unless the store is at the newest revision."),
    ] = False,
    as_json: JsonOpt = False,
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
        raise fail(f"invalid KENSA_STORE_URL: {exc}") from exc
    except OperationalError as exc:
        raise _unreachable(shown_url, exc) from exc

    head = head_revision()
    if as_json:
        print_json({"store": shown_url, "current": revision, "newest": head, "up_to_date": revision == head})
    else:
        console.print(f"store     {escape(shown_url)}")
        console.print(f"current   {_revision_label(revision)}")
        console.print(f"newest    {head}")
        if revision != head:
            console.print("[yellow]behind: run `kensa db upgrade`[/yellow]")
    if revision != head and check:
        raise typer.Exit(ExitCode.GATE)
