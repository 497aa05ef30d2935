"""A sweep's Optuna study, kept in gemcut's database: the service's job store unless `--db` names another.

    python -m pytest -q tests/test_sweep.py

    storage = study_storage(db_url)                        # SQLite under $GEMCUT_HOME/service, or PostgreSQL
    study = open_study("tweets", storage, direction="maximize", seed=0, pruner=make_pruner("median", 2))

The study's tables are Optuna's own (studies, trials, trial_values, ...) beside the service's (service_*), in
the same file or server. Re-running the same sweep loads the study (`load_if_exists`) and adds trials to it;
several processes or machines on one database add trials to one study. A trial whose process died while it
ran stops heartbeating; the next process to start a trial fails it and queues it again, with the same
parameters, once (Optuna's RetryHeartbeatStaleTrialCallback).

The TPE sampler is seeded with `seed + the number of trials the study holds`, so a resumed sweep does not
replay the random start-up trials it already ran, and the same command on the same study reproduces its
suggestions.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from gemcut.dbfiles import make_private
from gemcut.errors import GemcutError

HEARTBEAT_S = 30  # a running trial writes a heartbeat this often
GRACE_S = 120  # a trial silent for this long belongs to a process that died
PRUNERS = ("median", "halving", "none")


def study_storage(url: str) -> RDBStorage:
    """Optuna's RDB storage on `url` (a SQLAlchemy URL), with heartbeats so a crashed trial is retried."""
    make_private(url)  # SQLite: an owner-only file, as the job store's
    engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except ImportError:
            raise GemcutError(f"the study database {url.split('://', 1)[0]}:// needs its driver: pip install "
                              "'gemcut[postgres]' (psycopg) for PostgreSQL") from None


def make_pruner(kind: str, startup_trials: int) -> optuna.pruners.BasePruner:
    """median: stop a trial whose value at a step is worse than the median of earlier trials at that step (once
    `startup_trials` have finished); halving: successive halving (asynchronous, Li et al. 2018); none."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise GemcutError(f"--pruner {kind!r} is not one gemcut knows; use {', '.join(PRUNERS)}")


def existing_trials(storage: RDBStorage, name: str) -> int:
    """How many trials the study `name` holds (0 when there is no such study)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def open_study(name: str, storage: RDBStorage, *, direction: str, seed: int,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study `name` or load it (a resumed sweep); its direction must match the one asked."""
    sampler = optuna.samplers.TPESampler(seed=seed + existing_trials(storage, name))
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    held = study.direction.name.lower()  # "minimize" or "maximize"
    if held != direction:
        raise GemcutError(f"study {name!r} was created to {held} its metric, not to {direction} it; continue it with "
                          f"--direction {held[:3]}, or start another with --name")
    return study


def load_study(name: str, storage: RDBStorage) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise GemcutError(f"no study named {name!r} in this database; its studies: {', '.join(names) or 'none'}") from None
