"""`gemcut runs`: the run folders under a folder, with how each ended and its evaluation headline.

    gemcut runs                 # runs/
    gemcut runs path/to/runs --json
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from gemcut.cli import app

COLUMNS = ("name", "task", "base", "status", "steps", "headline", "size")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _cells(row) -> list[str]:
    steps = "-" if row.steps is None else f"{row.steps}/{row.max_steps}" if row.max_steps else str(row.steps)
    return [row.name, row.task, row.base, row.status, steps, row.headline or "not evaluated", _size(row.bytes)]


@app.command("runs")
def runs_cmd(root: str = typer.Argument("runs", help="Folder that holds run folders (output.dir)."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List run folders: name, task, base model, status, steps, evaluation headline, size (newest first)."""
    from gemcut.train.runs_list import list_runs

    rows = list_runs(root)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        typer.echo(f"no run folders under {root}/ (a run folder holds a config.yaml; `gemcut train CONFIG` makes one)")
        return
    if not sys.stdout.isatty():
        # A pipe or a file gets whole values, tab-separated: nothing cut to a terminal's width.
        typer.echo("\t".join(COLUMNS))
        for row in rows:
            typer.echo("\t".join(_cells(row)))
        return
    table = Table(title=f"runs in {root}/")
    for col in COLUMNS:
        table.add_column(col, overflow="fold", justify="right" if col in ("steps", "size") else "left")
    for row in rows:
        table.add_row(*_cells(row))
    Console().print(table)
