"""`gemcut models` and `gemcut estimate CONFIG`: what models are here, and will a run fit.

    gemcut models
    gemcut estimate examples/sft_chatterbot.yaml train.batch_size=4 [--processes 4] [--no-probe] [--json]
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from gemcut.cli import app

console = Console()


@app.command("models")
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the models available locally (packaged aliases, converted folders, the HF cache), with sizes."""
    from gemcut.home import gemcut_home
    from gemcut.models.resolve import format_parameters, list_local_models

    rows = list_local_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"models (gemcut home: {gemcut_home()})")
    for col in ("name", "parameters", "status", "source", "path"):
        table.add_column(col, overflow="fold", justify="right" if col == "parameters" else "left")
    for r in rows:
        table.add_row(r["name"], format_parameters(r["parameters"]), r["status"], r["source"], r["path"] or "-")
    console.print(table)


@app.command("estimate")
def estimate_cmd(config: str = typer.Argument(..., help="YAML run file."),
                 overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
                 probe: bool = typer.Option(True, "--probe/--no-probe", help="Run a few real forward+backward passes: measured activations and time (at most 7 passes)."),
                 processes: int = typer.Option(None, "--processes", min=1, help="Processes the run will be launched on: memory per device under DDP, FSDP2 and ZeRO for them. Default: the launcher's WORLD_SIZE, else 1."),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text.")) -> None:
    """Parameters, memory (weights, gradients, optimizer, activations; per device under each distributed
    strategy with --processes) and the time of `gemcut train` (prepare, tokenize, load, steps, validation,
    samples) on this machine as it is now, before launching it. Exits 1 when the configured strategy does not fit."""
    from gemcut.config import load_config
    from gemcut.train.estimate import estimate

    est = estimate(load_config(config, list(overrides or [])), probe=probe, processes=processes)
    if as_json:
        typer.echo(json.dumps(est.to_dict(), indent=2))
    else:
        for line in est.lines():
            console.print(line, markup=False, highlight=False, soft_wrap=True)  # a table row stays one line
    if not est.fits:
        raise typer.Exit(1)
