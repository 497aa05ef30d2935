"""A whole sweep: the base config and its space checked, the study opened (or resumed), trials run as ordinary
`gemcut train` run folders, then the table, best.yaml, the best trial evaluated and the HTML report.

    gemcut sweep examples/sft_chatterbot.yaml --space examples/sweeps/sweep_space.yaml --trials 12 --timeout 2700
    python -m pytest -q tests/test_sweep.py

    result = run_sweep(SweepSettings(config=Path("run.yaml"), space=Path("space.yaml"), trials=6))

Trial n trains in `<output.dir>/<study>/trial-<n>` (the base config's output.dir), started as
`python -m gemcut train CONFIG [overrides] <the trial's keys> output.dir=<output.dir>/<study> output.name=trial-<n>`,
its output in `<study folder>/logs/trial-<n>.log`. At each of its validations the trial reports the watched
metric to Optuna at the step "examples seen" (the run's step x train.batch_size), so the pruner compares trials
of different batch sizes at the same amount of data. A trial's value is the watched metric of the weights in
its final/: the last evaluation's, or with early stopping the kept checkpoint's.

`trials` is the size of the whole study: trials already complete or pruned count, so the same command run
again after a crash finishes the sweep instead of starting it over. `timeout` is a wall-clock budget: no trial
starts after it, and a trial still running when it ends is stopped (it saves its checkpoint) and recorded as
failed, "stopped by the budget". Ctrl-C or SIGTERM stops the running trials the same way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml

from gemcut.config import RunConfig, apply_overrides, load_config
from gemcut.errors import ConfigError, GemcutError
from gemcut.service.job_folder import eval_headline
from gemcut.service.job_process import start_child
from gemcut.service.settings import ServiceSettings
from gemcut.sweep.results import trial_rows, write_best_config, write_report, write_trials_csv
from gemcut.sweep.space import SearchSpace, as_override, load_space
from gemcut.sweep.study import make_pruner, open_study, study_storage
from gemcut.sweep.trial_run import run_trial
from gemcut.tasks import resolve_task

log = logging.getLogger("gemcut.sweep")

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class TrialFailed(GemcutError):
    """A trial that could not give a value: its run failed, its config was refused, or it was stopped."""


@dataclass
class SweepSettings:
    config: Path
    space: Path
    overrides: list[str] = field(default_factory=list)
    trials: int = 20
    parallel: int = 1
    metric: str = "auto"
    direction: str | None = None  # "min" or "max"; None: the watched metric's mode
    pruner: str = "median"
    startup_trials: int = 2
    name: str | None = None
    db: str | None = None
    timeout: float | None = None
    seed: int = 0
    evaluate: bool = True
    poll_s: float = 1.0


@dataclass
class SweepResult:
    study: optuna.Study
    study_dir: Path
    rows: list[dict]
    best_dir: Path | None
    headline: dict | None
    interrupted: bool = False


@dataclass
class SweepPlan:
    """What every trial shares, resolved once before the first: the base config, the space, where and what."""

    settings: SweepSettings
    base_raw: dict
    config: RunConfig
    space: SearchSpace
    metric: str
    direction: str  # "minimize" or "maximize"
    name: str
    study_dir: Path
    db_url: str


def plan_sweep(s: SweepSettings) -> SweepPlan:
    """Check the config, its overrides and the space (a ConfigError naming the file and key), and resolve the
    metric, its direction, the study's name and folder, and the database."""
    if s.parallel < 1 or s.trials < 1:
        raise ConfigError("--trials and --parallel must be at least 1")
    config = load_config(s.config, list(s.overrides))  # the base config's own errors, in its own words
    base_raw = apply_overrides(yaml.safe_load(Path(s.config).read_text(encoding="utf-8")) or {}, list(s.overrides))
    space = load_space(s.space, base_raw, str(s.config))
    metric, mode = config.watched_metric(resolve_task(config.objective.kind, config.data.kind))
    if s.metric != "auto":
        metric = s.metric if s.metric.startswith("val_") else f"val_{s.metric}"
        mode = "min" if metric.endswith("loss") else "max"
    direction = s.direction or mode
    if direction not in ("min", "max"):
        raise ConfigError(f"--direction {direction!r}: use min or max")
    if config.train.eval_every is None and s.pruner != "none":
        log.warning("%s: train.eval_every is not set, so each trial validates only at its end and none can be pruned; "
                    "set train.eval_every (steps between validations) to prune", s.config)
    name = s.name or Path(s.config).stem
    return SweepPlan(settings=s, base_raw=base_raw, config=config, space=space, metric=metric,
                     direction="minimize" if direction == "min" else "maximize", name=name,
                     study_dir=Path(config.output.dir).resolve() / name, db_url=s.db or ServiceSettings().jobs_db())


def trial_overrides(plan: SweepPlan, chosen: dict, number: int) -> list[str]:
    """The command-line overrides of trial `number`: the base ones, the trial's keys, its run folder, and one
    thread share each when trials run side by side and the config leaves train.num_threads to torch."""
    out = list(plan.settings.overrides) + [as_override(k, v) for k, v in chosen.items()]
    if plan.settings.parallel > 1 and plan.config.train.num_threads is None and "train.num_threads" not in chosen:
        out.append(f"train.num_threads={max(1, (os.cpu_count() or 1) // plan.settings.parallel)}")
    return out + [f"output.dir={plan.study_dir}", f"output.name=trial-{number}"]


def final_value(run_dir: Path, values: dict[int, float]) -> float | None:
    """The metric of the weights in final/: the kept checkpoint's step when early stopping chose one, else the last."""
    try:
        final_from = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get("final_from")
    except (OSError, ValueError, AttributeError):
        final_from = None
    if isinstance(final_from, str) and final_from.startswith("step-") and final_from[5:].isdigit():
        step = int(final_from[5:])
        if step in values:
            return values[step]
    return values[max(values)] if values else None


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


class Objective:
    """Optuna's objective: one trial, run as a child `gemcut train`."""

    def __init__(self, plan: SweepPlan, stopping: threading.Event, deadline: float | None):
        self.plan, self.stopping, self.deadline = plan, stopping, deadline

    def should_stop(self) -> bool:
        return self.stopping.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def __call__(self, trial: optuna.Trial) -> float:
        plan = self.plan
        chosen = plan.space.suggest(trial)
        overrides = trial_overrides(plan, chosen, trial.number)
        run_dir = plan.study_dir / f"trial-{trial.number}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", [as_override(k, v) for k, v in chosen.items()])
        try:
            config = load_config(plan.settings.config, overrides)  # a combination no single key showed to be invalid
        except ConfigError as e:
            trial.set_user_attr("error", str(e))
            raise TrialFailed(f"trial {trial.number}: {e}") from None
        if self.should_stop():
            trial.set_user_attr("error", "not started: the sweep was stopping")
            raise TrialFailed(f"trial {trial.number}: not started, the sweep is stopping")
        log_path = plan.study_dir / "logs" / f"trial-{trial.number}.log"
        command = [sys.executable, "-m", "gemcut", "train", str(plan.settings.config), *overrides]
        log.info("trial %d: %s", trial.number, " ".join(trial.user_attrs["overrides"]) or "(the base config)")

        def report(step: int, value: float) -> bool:
            # Optuna's step is examples seen, so trials of different batch sizes are compared at the same data.
            trial.report(value, step * config.train.batch_size)
            return trial.should_prune()

        outcome = run_trial(command, run_dir=run_dir, log=log_path, metric=plan.metric, report=report,
                            should_stop=self.should_stop, poll_s=plan.settings.poll_s)
        if outcome.last is not None:
            trial.set_user_attr("last_step", outcome.last[0])
        if outcome.stopped == "pruned":
            log.info("trial %d: pruned at step %d (%s %.4f)", trial.number, outcome.last[0], plan.metric, outcome.last[1])
            raise optuna.TrialPruned()
        if outcome.stopped == "stopped":
            trial.set_user_attr("error", "stopped by the sweep's budget or an interrupt")
            raise TrialFailed(f"trial {trial.number}: stopped by the sweep's budget or an interrupt")
        if outcome.code != 0:
            error = f"gemcut train exited with {outcome.code}: {log_tail(log_path)} (log: {log_path})"
            trial.set_user_attr("error", error)
            raise TrialFailed(f"trial {trial.number}: {error}")
        value = final_value(run_dir, outcome.values)
        if value is None:
            error = (f"the run never logged {plan.metric} (is there a validation split? see {run_dir / 'metrics.jsonl'} "
                     "for the metrics it logs; --metric picks another)")
            trial.set_user_attr("error", error)
            raise TrialFailed(f"trial {trial.number}: {error}")
        return value


def run_sweep(s: SweepSettings, *, on_trial=None) -> SweepResult:
    """Run (or resume) the sweep; then write trials.csv, best.yaml and report.html in the study folder."""
    plan = plan_sweep(s)
    plan.study_dir.mkdir(parents=True, exist_ok=True)
    storage = study_storage(plan.db_url)
    study = open_study(plan.name, storage, direction=plan.direction, seed=s.seed,
                       pruner=make_pruner(s.pruner, s.startup_trials))
    _remember(study, plan)
    done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    log.info("study %s in %s: %d of %d trials finished%s; run folders in %s", plan.name, _shown(plan.db_url), done,
             s.trials, " (resuming)" if done else "", plan.study_dir)
    stopping = threading.Event()
    deadline = time.monotonic() + s.timeout if s.timeout else None
    objective = Objective(plan, stopping, deadline)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial is not None:
            on_trial(study, trial)
        if stopping.is_set() or sum(t.state in FINISHED for t in study.get_trials(deepcopy=False)) >= s.trials:
            study.stop()  # the study is full (other processes add trials too) or we were asked to stop

    interrupted = False
    restore = _stop_on_signals(stopping)
    try:
        if done < s.trials:
            study.optimize(objective, n_trials=s.trials - done, timeout=s.timeout, n_jobs=s.parallel,
                           catch=(TrialFailed,), callbacks=[after_trial], gc_after_trial=False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        restore()
    interrupted = interrupted or stopping.is_set()
    return finish_sweep(plan, study, evaluate=s.evaluate and not interrupted, interrupted=interrupted)


def finish_sweep(plan: SweepPlan, study: optuna.Study, *, evaluate: bool, interrupted: bool = False) -> SweepResult:
    """The table, best.yaml, the best trial evaluated (once) and the report, from what the study holds now."""
    rows = trial_rows(study)
    write_trials_csv(rows, plan.study_dir / "trials.csv")
    best_dir, headline = None, None
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if complete:
        best = study.best_trial
        best_dir = Path(best.user_attrs["run_dir"])
        write_best_config(plan.base_raw, best.user_attrs.get("overrides", []), plan.study_dir / "best.yaml",
                          run_dir=best_dir)
        if evaluate and not (best_dir / "eval.json").is_file():
            log.info("evaluating the best trial (%d): gemcut eval %s", best.number, best_dir)
            child = start_child([sys.executable, "-m", "gemcut", "eval", str(best_dir)],
                                log=plan.study_dir / "logs" / f"eval-trial-{best.number}.log",
                                env={"PYTHONUNBUFFERED": "1"})
            if child.wait() != 0:
                log.warning("gemcut eval of the best trial failed: %s", log_tail(plan.study_dir / "logs" / f"eval-trial-{best.number}.log"))
        headline = eval_headline(best_dir)
    write_report(study, rows, plan.study_dir / "report.html", metric=plan.metric, headline=headline, best_dir=best_dir)
    return SweepResult(study, plan.study_dir, rows, best_dir, headline, interrupted)


def _shown(url: str) -> str:
    """The URL without its password (`postgresql+psycopg://user:***@host/db`)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _remember(study: optuna.Study, plan: SweepPlan) -> None:
    """The study's own record of what it sweeps (gemcut sweep status reads it); a resume must watch the same metric."""
    known = study.user_attrs.get("metric")
    if known is not None and known != plan.metric:
        raise ConfigError(f"study {plan.name!r} watches {known}, not {plan.metric}; use --metric {known} to continue it, "
                          "or --name for a new study")
    for key, value in {"metric": plan.metric, "config": str(Path(plan.settings.config).resolve()),
                       "space": str(Path(plan.settings.space).resolve()), "study_dir": str(plan.study_dir),
                       "overrides": list(plan.settings.overrides)}.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def _stop_on_signals(stopping: threading.Event):
    """SIGINT and SIGTERM set `stopping` (running trials are SIGTERMed at their next poll); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, _frame):
        if stopping.is_set():  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        log.warning("stopping: the running trials finish their step and save; Ctrl-C again to stop at once")
        stopping.set()

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    return restore
