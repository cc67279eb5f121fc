"""``kensa backbones``: pretrained ImageNet backbones that ship inside index packages."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import JsonOpt, console, print_json, warn

app = typer.Typer(
    help="Pretrained ImageNet backbones shipped in packages (never downloaded).", no_args_is_help=True
)


@app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """The catalogue: installed or not, file, sha256, licence, parameters, top-1, normalisation."""
    from kensa.models.nets.backbones import list_backbones

    rows = list_backbones()
    if as_json:
        print_json(rows)
        return
    table = Table(
        "name", "installed", "package", "file", "sha256", "licence", "params", "top-1 %", "normalisation"
    )
    for r in rows:
        table.add_row(
            *(escape(str(r[k])) for k in ("name", "installed", "package", "file", "sha256", "licence")),
            f"{r['params']:,}",
            f"{r['top1']:.1f}",
            escape(str(r["normalisation"])),
        )
    console.print(table)
    for r in rows:
        if r["installed"] == "no":
            warn(f"{r['name']} is not installed; run: {r['install']}")
