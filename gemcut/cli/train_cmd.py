"""`gemcut train CONFIG [key=value ...] [--resume | --resume-from step-N]`: one training run into runs/<name>/.

    gemcut train examples/sft_chatterbot.yaml train.max_steps=20 output.name=try1
    gemcut train examples/sft_chatterbot.yaml output.name=try1 --resume
    gemcut train examples/sft_chatterbot.yaml output.name=try1 --resume-from step-40

Ctrl-C or SIGTERM saves a checkpoint and exits with 128 + the signal's number (130, 143).
"""

from __future__ import annotations

import signal
import sys

import typer

from gemcut.cli import app
from gemcut.config import load_config


@app.command("train")
def train(config: str = typer.Argument(..., help="YAML run file (see examples/)."),
          overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=1e-4"),
          resume: bool = typer.Option(False, "--resume", help="Continue the run folder from its newest complete checkpoint."),
          resume_from: str = typer.Option(None, "--resume-from", metavar="step-N",
                                          help="Continue from this checkpoint instead of the newest (one that is damaged, say); "
                                               "the checkpoints after it are removed.")) -> None:
    """Train per CONFIG: prepare data, load the model, fit, save final/ and a manifest; prints the run folder."""
    from gemcut.train.run import train_run

    cfg = load_config(config, list(overrides or []))
    try:
        outcome = train_run(cfg, resume=resume_from or resume, command=["gemcut", "train", config, *(overrides or [])])
    except KeyboardInterrupt:  # before or after the loop; inside it, Ctrl-C saves a checkpoint and returns
        typer.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)
    if outcome.stopped == "interrupted":  # the checkpoint is saved and the resume command printed
        sys.exit(128 + signal.Signals[outcome.reason].value)
    if outcome.main:  # one line for the run, however many processes trained it
        typer.echo(str(outcome.run_dir))
