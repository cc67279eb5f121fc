"""``kensa keys``: issue, revoke and list the API keys that open the inference service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import JsonOpt, Role, console, err_console, fail, get_settings, print_json

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session

app = typer.Typer(
    help="API keys (stored hashed; a key is shown once, when it is made).", no_args_is_help=True
)

# Who acts in the audit trail when a person runs these commands on the server's machine.
CLI_ACTOR = "cli"


def _session() -> Session:
    from kensa.store.engine import make_engine, make_session_factory
    from kensa.store.migrate import upgrade

    url = get_settings().resolved_store_url
    upgrade(url)  # a fresh embedded store works without a separate `kensa db upgrade`
    return make_session_factory(make_engine(url))()


@app.command()
def create(
    role: Annotated[Role, typer.Option("--role", help="line | operator | data-scientist | auditor | admin")],
    name: Annotated[str, typer.Option("--name", help="Who or what uses the key (e.g. 'line-3 PLC').")],
) -> None:
    """Make a key and print it once; only its hash is stored."""
    from kensa.store.audit import append_event
    from kensa.store.keys import create_key

    with _session() as session:
        try:
            plaintext, row = create_key(session, name, role.value)
        except ValueError as exc:
            raise fail(str(exc)) from exc
        append_event(
            session,
            actor=CLI_ACTOR,
            action="key.create",
            subject=f"key:{row.id}",
            details={"name": row.name, "role": row.role, "prefix": row.prefix},
        )
        session.commit()
        err_console.print(
            f"key {row.id} ({escape(row.role)}, {escape(row.name)}) created; it is shown once, store it now:"
        )
        # The key alone on stdout, so `KEY=$(kensa keys create ...)` captures exactly it.
        print(plaintext)  # noqa: T201


@app.command()
def revoke(key_id: Annotated[int, typer.Argument(help="The key's id (see `kensa keys list`).")]) -> None:
    """Revoke a key for good (the service notices within seconds)."""
    from kensa.store.audit import append_event
    from kensa.store.keys import UnknownKeyError, revoke_key

    with _session() as session:
        try:
            row = revoke_key(session, key_id)
        except UnknownKeyError as exc:
            raise fail(str(exc)) from exc
        append_event(
            session,
            actor=CLI_ACTOR,
            action="key.revoke",
            subject=f"key:{row.id}",
            details={"name": row.name, "role": row.role},
        )
        session.commit()
        console.print(f"key {row.id} ({escape(row.name)}) revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@app.command("list")
def list_keys(as_json: JsonOpt = False) -> None:
    """List keys: id, prefix, role, name, created, last used, revoked (never the key)."""
    from sqlalchemy import select

    from kensa.store.models import ApiKey

    with _session() as session:
        rows = session.scalars(select(ApiKey).order_by(ApiKey.id)).all()
    if as_json:
        print_json(
            [
                {
                    "id": row.id,
                    "prefix": row.prefix,
                    "role": row.role,
                    "name": row.name,
                    "created_at": _iso(row.created_at),
                    "last_used_at": _iso(row.last_used_at),
                    "revoked_at": _iso(row.revoked_at),
                }
                for row in rows
            ]
        )
        return
    table = Table("id", "prefix", "role", "name", "created", "last used", "revoked")

    def when(value: object) -> str:
        return f"{value:%Y-%m-%d %H:%M}" if value is not None else "-"

    for row in rows:
        table.add_row(
            str(row.id),
            escape(row.prefix),
            row.role,
            escape(row.name),
            when(row.created_at),
            when(row.last_used_at),
            when(row.revoked_at),
        )
    console.print(table)
