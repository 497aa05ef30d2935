"""`gemcut config show|schema`: the resolved run configuration and its schema."""

from __future__ import annotations

import json

import typer

from gemcut.cli import app
from gemcut.config import json_schema, load_config

config_app = typer.Typer(no_args_is_help=True, help="Show the resolved config or its schema.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(config: str | None = typer.Argument(None, help="YAML run file; omitted means defaults."),
         overrides: list[str] = typer.Argument(None, help="key.sub=value overrides")) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    overrides = list(overrides or [])
    if config is not None and "=" in config:  # only overrides were given
        config, overrides = None, [config, *overrides]
    typer.echo(load_config(config, overrides).to_yaml(), nl=False)


@config_app.command("schema")
def schema() -> None:
    """Print the JSON schema of a run config, with every field's description."""
    typer.echo(json.dumps(json_schema(), indent=2))
