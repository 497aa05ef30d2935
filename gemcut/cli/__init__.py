"""The `gemcut` command: thin wrappers that parse, call the layers, and print.

Each command group lives in its own module here; errors meant for people (`GemcutError`) print as plain
lines and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys

import typer

from gemcut.errors import GemcutError

# One wording for every command that loads a model folder someone else may have made.
TRUST_REMOTE_CODE_HELP = ("Run Python files shipped in the model or run folder (its config.json auto_map); only for folders "
                          "you trust. A folder can never turn this on by itself.")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tune language models on your data, evaluate, export, serve.")


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from gemcut.cli import config_cmd, data_cmd, eval_cmd, label_cmd, models_cmd, quickstart_cmd, serve_cmd, train_cmd  # noqa: F401


def main() -> None:
    _register()
    try:
        app(standalone_mode=False)
    except GemcutError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
