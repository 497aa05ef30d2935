"""gemcut sweep on a tiny random BERT classifier: pruning stops a trial within one evaluation interval, a study
resumes instead of restarting, bad spaces are refused naming their key, best.yaml reproduces the best
trial's config, conditional keys are honoured.

    python -m pytest -q tests/test_sweep.py

Every trial is a real `python -m gemcut train` child process (a few seconds each on a tiny model).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from eval_runs import label_file
from tiny import save_tiny_bert

from gemcut.config import RunConfig, load_config
from gemcut.errors import ConfigError
from gemcut.sweep.results import best_config
from gemcut.sweep.runner import SweepSettings, plan_sweep, run_sweep
from gemcut.sweep.space import load_space, parse_space
from gemcut.sweep.study import study_storage

EVAL_EVERY = 20


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A run config: a tiny BERT classifier on 120 labelled lines, validated every EVAL_EVERY steps."""
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny_bert(root / "bert")
    data = label_file(root / "labels.jsonl", n=120)
    config = {"data": {"train": [str(data)], "split": {"validation": 0.2, "test": 0.2}},
              "model": {"name": str(model)}, "adapter": {"method": "full"},
              "train": {"max_steps": 6 * EVAL_EVERY, "eval_every": EVAL_EVERY, "save_every": 1000, "batch_size": 8,
                        "lr": 1e-3, "precision": "fp32", "warmup_steps": 0, "report_to": "none", "num_threads": 1},
              "eval": {"forgetting_data": None, "bootstrap": 20, "compare_base": False},
              "output": {"dir": str(root / "runs")}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def settings(base: Path, space: Path, name: str, **kw) -> SweepSettings:
    return SweepSettings(config=base, space=space, name=name, db=f"sqlite:///{base.parent / 'study.db'}",
                         metric="val_loss", poll_s=0.05, evaluate=False, **kw)


def enqueue(s: SweepSettings, *params: dict) -> None:
    """Fix the next trials' parameters (the sampler is random at first; the tests need a known order)."""
    plan = plan_sweep(s)
    study = optuna.create_study(study_name=plan.name, storage=study_storage(plan.db_url), direction=plan.direction,
                                load_if_exists=True)
    for p in params:
        study.enqueue_trial(p)


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_a_diverging_trial_is_pruned_within_one_evaluation_interval(base, tmp_path):
    space = write_space(tmp_path / "space.yaml", "train.lr: {values: [1.0e-3, 50.0]}\n")
    s = settings(base, space, "prune", trials=3, startup_trials=1)
    enqueue(s, {"train.lr": 1e-3}, {"train.lr": 50.0}, {"train.lr": 1e-3})
    result = run_sweep(s)
    states = {t.number: t.state for t in result.study.trials}
    assert states == {0: optuna.trial.TrialState.COMPLETE, 1: optuna.trial.TrialState.PRUNED,
                      2: optuna.trial.TrialState.COMPLETE}
    pruned = result.study.trials[1]
    first_report = min(pruned.intermediate_values) // 8  # Optuna's step is examples seen: step x batch size
    last = max(metric_steps(Path(pruned.user_attrs["run_dir"])))
    assert last <= first_report + EVAL_EVERY, f"pruned at step {first_report} but trained to step {last}"
    assert last < 6 * EVAL_EVERY
    assert [r["state"] for r in result.rows] == ["COMPLETE", "PRUNED", "COMPLETE"]
    csv_text = (result.study_dir / "trials.csv").read_text()
    assert csv_text.splitlines()[0].startswith("number,state,value,train.lr")
    report = (result.study_dir / "report.html").read_text()
    assert "data:image/png;base64," in report and "http" not in report.replace("http-equiv", "")


def test_a_resumed_study_continues_and_best_yaml_reproduces_the_best_trial(base, tmp_path):
    space = write_space(tmp_path / "space.yaml", "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                                 "train.warmup_ratio: {low: 0.0, high: 0.2}\n")
    first = run_sweep(settings(base, space, "resume", trials=1, pruner="none"))
    lr0 = first.study.trials[0].params["train.lr"]
    again = run_sweep(settings(base, space, "resume", trials=2, pruner="none"))
    trials = again.study.trials
    assert [t.number for t in trials] == [0, 1]
    assert trials[0].params["train.lr"] == lr0  # the first trial kept, not run again
    assert trials[1].params["train.lr"] != lr0  # the sampler did not replay its first suggestion
    assert (first.study_dir / "trial-1" / "final").is_dir()
    done = run_sweep(settings(base, space, "resume", trials=2, pruner="none"))  # full: nothing more to run
    assert len(done.study.trials) == 2

    best = done.study.best_trial
    written = RunConfig.model_validate(yaml.safe_load((done.study_dir / "best.yaml").read_text()))
    ran = RunConfig.model_validate(yaml.safe_load((Path(best.user_attrs["run_dir"]) / "config.yaml").read_text()))
    assert written.train.lr == pytest.approx(best.params["train.lr"], rel=1e-12)
    assert written.model_dump(exclude={"output"}) == ran.model_dump(exclude={"output"})


def test_a_trial_left_running_by_a_crash_is_run_again_with_its_parameters(base, tmp_path, monkeypatch):
    import gemcut.sweep.study as study_module

    monkeypatch.setattr(study_module, "HEARTBEAT_S", 1)
    monkeypatch.setattr(study_module, "GRACE_S", 1)
    space = write_space(tmp_path / "space.yaml", "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    s = settings(base, space, "crash", trials=1, pruner="none")
    plan = plan_sweep(s)
    storage = study_storage(plan.db_url)
    with pytest.warns(UserWarning, match="Heartbeat"):  # optuna: heartbeats are for optimize; here we play its part
        crashed = optuna.create_study(study_name=plan.name, storage=storage, direction=plan.direction).ask()
    crashed.suggest_float("train.lr", 1e-4, 1e-2, log=True)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(plan.name), crashed.number)
    storage.record_heartbeat(trial_id)  # what a sweep process does while its trial runs; then it died
    time.sleep(2.5)
    result = run_sweep(s)
    first, retry = result.study.trials
    assert first.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == first.params and retry.system_attrs["failed_trial"] == 0


def test_conditional_keys_are_sampled_only_when_their_condition_holds(base, tmp_path):
    space = write_space(tmp_path / "space.yaml", "adapter.method: {values: [full, freeze]}\n"
                                                 "adapter.train_last_n_layers: {values: [1], when: {adapter.method: freeze}}\n")
    s = settings(base, space, "conditional", trials=2, pruner="none")
    enqueue(s, {"adapter.method": "full"}, {"adapter.method": "freeze", "adapter.train_last_n_layers": 1})
    result = run_sweep(s)
    first, second = result.study.trials
    assert first.params == {"adapter.method": "full"}
    assert second.params == {"adapter.method": "freeze", "adapter.train_last_n_layers": 1}
    assert "adapter.train_last_n_layers=1" in second.user_attrs["overrides"]
    assert not any("train_last_n_layers" in o for o in first.user_attrs["overrides"])


@pytest.mark.parametrize("text, message", [
    ("train.lrr: {low: 1.0e-5, high: 1.0e-3}\n", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("train.lr: {low: 1.0e-3, high: 1.0e-5}\n", "train.lr: low 0.001 > high 1e-05"),
    ("train.lr: {low: 0.0, high: 1.0e-3, log: true}\n", "train.lr: a log range needs low > 0"),
    ("train.batch_size: {values: []}\n", "train.batch_size: values must be a non-empty list"),
    ("adapter.r: {values: [8], when: {adapter.methd: lora}}\n", "adapter.r: when names 'adapter.methd'"),
    ("train.batch_size: {values: [16, 0]}\n", "train.batch_size: Input should be greater than or equal to 1"),
    ("adapter.method: {values: [lora, fancy]}\n", "adapter.method: Input should be"),
    ("train.lr: {low: 1.0e-5, hihg: 1.0e-3}\n", "train.lr: unknown field 'hihg'"),
])
def test_bad_spaces_are_refused_naming_the_file_and_key(base, tmp_path, text, message):
    space = write_space(tmp_path / "space.yaml", "train.warmup_ratio: {low: 0.0, high: 0.1}\n" + text)
    raw = yaml.safe_load(base.read_text())
    with pytest.raises(ConfigError) as err:
        load_space(space, raw, str(base))
    assert str(space) in str(err.value)
    assert message in str(err.value)
    assert f"{space}:2:" in str(err.value)  # the key's line in the file


def test_spaces_read_as_people_write_them(tmp_path):
    space = parse_space(write_space(tmp_path / "space.yaml", "train.lr: {low: 1e-5, high: 1e-3, log: true}\n"
                                                             "train.max_steps: {low: 10, high: 40, step: 10}\n"))
    lr, steps = space.params
    assert (lr.low, lr.high, lr.log, lr.is_int) == (1e-5, 1e-3, True, False)  # YAML's "1e-5" string read as a number
    assert steps.is_int and steps.distribution().step == 10


def test_the_sweep_command_and_its_status(base, tmp_path):
    """The CLI end to end on one trial: the table, the study folder, then `gemcut sweep status`."""
    space = write_space(tmp_path / "space.yaml", "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    run = subprocess.run([sys.executable, "-m", "gemcut", "sweep", str(base), f"train.max_steps={EVAL_EVERY}",
                          "--space", str(space), "--trials", "1", "--db", db, "--name", "cli", "--pruner", "none"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    study_dir = Path(load_config(base).output.dir) / "cli"
    assert (study_dir / "best.yaml").is_file() and (study_dir / "report.html").is_file()
    headline = json.loads((study_dir / "trial-0" / "eval.json").read_text())
    assert "report.html" in (study_dir / "report.html").read_text() or headline["headline"] in (study_dir / "report.html").read_text()
    status = subprocess.run([sys.executable, "-m", "gemcut", "sweep", "status", "cli", "--db", db],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "complete" in status.stdout and "train.lr" in status.stdout
    bad = subprocess.run([sys.executable, "-m", "gemcut", "sweep", str(base), "--space", str(tmp_path / "nope.yaml"),
                          "--db", db], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.yaml: no such search space file" in bad.stderr


def test_best_config_applies_the_overrides_to_the_base(base):
    raw = yaml.safe_load(base.read_text())
    config = best_config(raw, ["train.lr=0.0005", "adapter.method=freeze"])
    assert config.train.lr == 0.0005 and config.adapter.method == "freeze"
    assert config.train.eval_every == EVAL_EVERY
