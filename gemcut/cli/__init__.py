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


def register_commands() -> None:
    """Add every command group to `app` (what `main` does first; tests call it before driving `app`)."""
    # Imported for their side effect of adding commands to `app`.
    from gemcut.cli import (  # noqa: F401
        config_cmd,
        data_cmd,
        eval_cmd,
        keys_cmd,
        label_cmd,
        models_cmd,
        quickstart_cmd,
        runs_cmd,
        serve_cmd,
        sweep_cmd,
        train_cmd,
        worker_cmd,
    )


def _version(value: bool) -> None:
    if value:
        from gemcut.version import __version__

        typer.echo(f"gemcut {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print gemcut's version and exit."),
             verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the libraries' progress bars, load reports and "
                                          "deprecation warnings, and gemcut's debug lines.")) -> None:
    """Fine-tune language models on your data, evaluate, export, serve."""
    from gemcut.cli.output import configure_output

    configure_output(verbose)


def usage_line(error) -> str:
    """A click usage error as one line with its fix: `error: Missing argument 'CONFIG'. (see `gemcut train --help`)`."""
    ctx = getattr(error, "ctx", None)
    command = ctx.command_path if ctx is not None else "gemcut"
    return f"error: {error.format_message()} (see `{command} --help`)"


def main() -> None:
    register_commands()
    try:
        code = app(standalone_mode=False, prog_name="gemcut")
    except GemcutError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.TyperException as e:  # click's usage errors (typer vendors click: its ClickException is this)
        if e.format_message():  # empty when `gemcut GROUP` alone has just printed its help
            typer.secho(usage_line(e), fg="red", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
