"""`gemcut train CONFIG [key=value ...] [--resume]`: one training run into runs/<name>/.

    gemcut train examples/sft_chatterbot.yaml train.max_steps=20 output.name=try1
    gemcut train examples/sft_chatterbot.yaml output.name=try1 --resume
"""

from __future__ import annotations

import sys

import typer

from gemcut.cli import app
from gemcut.config import load_config


@app.command("train")
def train(config: str = typer.Argument(..., help="YAML run file (see examples/)."),
          overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=1e-4"),
          resume: bool = typer.Option(False, "--resume", help="Continue the run folder from its newest complete checkpoint.")) -> None:
    """Train per CONFIG: prepare data, load the model, fit, save final/ and a manifest; prints the run folder."""
    from gemcut.train.run import train as run_training

    cfg = load_config(config, list(overrides or []))
    try:
        run_dir = run_training(cfg, resume=resume)
    except KeyboardInterrupt:  # before or after the loop; inside it, Ctrl-C saves a checkpoint and returns
        typer.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)
    typer.echo(str(run_dir))
