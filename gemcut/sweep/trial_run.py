"""One trial: `gemcut train` in a child process, its validation metric reported to Optuna at every evaluation,
stopped (SIGTERM) as soon as the pruner says so.

    python -m pytest -q tests/test_sweep.py -k pruned

    outcome = run_trial(command, run_dir=study_dir / "trial-3", log=study_dir / "logs" / "trial-3.log",
                        metric="val_loss", report=report, should_stop=should_stop, poll_s=1.0)

Each time metrics.jsonl gains a validation line with `metric`, `report(step, value)` is called and returns
whether the trial should stop (the pruner's verdict). The child is then sent SIGTERM: gemcut finishes the
step it is on, saves a checkpoint and exits, so a pruned trial stops within one evaluation interval of the
evaluation that condemned it. `should_stop()` (the sweep's budget ran out, Ctrl-C) stops it the same way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gemcut.service.job_process import start_child, wait_for

STOP_GRACE_S = 120.0  # after SIGTERM, the child finishes its step and saves; past this it is killed


@dataclass
class TrialOutcome:
    code: int | None  # the child's exit status (negative: killed by that signal)
    stopped: str | None = None  # "pruned" or "stopped" (budget or Ctrl-C) when we ended it early
    values: dict[int, float] = field(default_factory=dict)  # step -> the metric at each evaluation

    @property
    def last(self) -> tuple[int, float] | None:
        return max(self.values.items()) if self.values else None


class ValidationTail:
    """The validation lines of a growing metrics.jsonl: (step, value of `metric`) for each one not read yet."""

    def __init__(self, path: Path, metric: str):
        self.path, self.metric, self.offset = Path(path), metric, 0

    def read(self) -> list[tuple[int, float]]:
        try:
            with self.path.open("rb") as f:
                if f.seek(0, 2) < self.offset:  # rewritten (a resumed run): from the top again
                    self.offset = 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # whole lines only: the run may be writing the next one
        self.offset += end
        found = []
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            value, step = record.get(self.metric), record.get("step")
            if isinstance(step, int) and isinstance(value, (int, float)) and not isinstance(value, bool):
                found.append((step, float(value)))
        return found


def run_trial(command: list[str], *, run_dir: Path, log: Path, metric: str, report: Callable[[int, float], bool],
              should_stop: Callable[[], bool], poll_s: float = 1.0, env: dict | None = None) -> TrialOutcome:
    """Run `command` (a `gemcut train` whose run folder is `run_dir`) to its end or until told to stop."""
    child = start_child(command, log=log, env={"PYTHONUNBUFFERED": "1", **(env or {})})
    tail = ValidationTail(run_dir / "metrics.jsonl", metric)
    outcome = TrialOutcome(code=None)
    asked_at = None
    try:
        while True:
            code = wait_for(child, poll_s)
            for step, value in tail.read():
                outcome.values[step] = value
                # Once it is stopping, later lines are not reported: Optuna has its verdict.
                if outcome.stopped is None and report(step, value) and code is None:
                    outcome.stopped = "pruned"
            if code is not None:
                outcome.code = code
                return outcome
            if outcome.stopped is None and should_stop():
                outcome.stopped = "stopped"
            if outcome.stopped is not None and asked_at is None:
                child.send_signal(signal.SIGTERM)  # gemcut finishes the step, saves a checkpoint, exits 143
                asked_at = time.monotonic()
            elif asked_at is not None and time.monotonic() - asked_at > STOP_GRACE_S:
                child.kill()
    finally:
        if child.poll() is None:  # Ctrl-C or an error here: stop the child the gentle way, then for sure
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=STOP_GRACE_S)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                child.kill()
                child.wait()
