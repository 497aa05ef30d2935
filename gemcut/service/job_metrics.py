"""A running job's metrics.jsonl, read as it grows, turned into OpenAI's metrics events.

    python -m pytest -q tests/test_service_workers.py

    tail = MetricsTail(run_dir / "metrics.jsonl", emitted_through=12)   # steps up to 12 are already events
    for event in tail.read(total_steps=40): ...                        # MetricsEvent(step, message, data, level)
    tail.finish()                                                      # the run ended: what is still held

Training lines (loss, lr, grad_norm, mean_token_accuracy, ...) and validation lines (val_loss,
val_mean_token_accuracy, ...) become one event per logged step, OpenAI's shape: message "Step 12/40: training
loss=2.31", data {step, train_loss, train_mean_token_accuracy, valid_loss, valid_mean_token_accuracy,
total_steps}. A step's validation line follows its training line, so a training line is held until the next
line shows whether its step was validated. Only complete lines are read (the run may be writing one).

A resumed run rewrites the file to the lines up to its checkpoint and retraces the steps after it with the
same numbers (an exact resume): steps at or below `emitted_through` never become an event twice. Every
record read, old or new, is kept by step (`at_or_before`) for the checkpoints' metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MetricsEvent:
    step: int
    message: str
    data: dict
    level: str = "info"
    type: str = "metrics"


class MetricsTail:
    def __init__(self, path: Path, *, emitted_through: int = 0):
        self.path = Path(path)
        self.offset = 0
        self.emitted_through = emitted_through
        self.held: dict | None = None  # the newest training step's data, until its validation line is known
        self.by_step: dict[int, dict] = {}
        self.total_steps: int | None = None
        self.last: dict | None = None  # the newest training record read (progress, estimated finish)

    def read(self, total_steps: int | None = None) -> list[MetricsEvent]:
        """The events of the lines written since the last read."""
        self.total_steps = total_steps or self.total_steps
        events: list[MetricsEvent] = []
        for record in self._new_records():
            step = record.get("step")
            if not isinstance(step, int):
                continue
            if "loss" in record:
                events += self._release()
                self.last = record
                self.held = {"step": step, "train_loss": record["loss"],
                             "train_mean_token_accuracy": record.get("mean_token_accuracy"),
                             "valid_loss": None, "valid_mean_token_accuracy": None}
                self.by_step[step] = dict(self.held)
            elif "val_loss" in record:
                valid = {"valid_loss": record["val_loss"], "valid_mean_token_accuracy": record.get("val_mean_token_accuracy")}
                self.by_step.setdefault(step, {"step": step}).update(valid)
                if self.held is not None and self.held["step"] == step:
                    self.held.update(valid)
                    events += self._release()
            elif "warning" in record and step > self.emitted_through:
                events.append(MetricsEvent(step, f"Step {step}: {record['warning']}", {}, level="warn", type="message"))
            elif "collapsed" in record:
                events.append(MetricsEvent(step, f"Step {step}: {record['collapsed']}", {}, level="error", type="message"))
        return events

    def finish(self) -> list[MetricsEvent]:
        """The run has ended: the held step's event, and anything written since the last read."""
        return self.read() + self._release()

    def at_or_before(self, step: int) -> dict:
        """The metrics of the newest logged step at or before `step` (a checkpoint's), in OpenAI's names."""
        found = [s for s in self.by_step if s <= step]
        return {**self.by_step[max(found)], "step": step} if found else {"step": step}

    def _release(self) -> list[MetricsEvent]:
        held, self.held = self.held, None
        if held is None or held["step"] <= self.emitted_through:
            return []
        self.emitted_through = held["step"]
        data = {k: v for k, v in {**held, "total_steps": self.total_steps}.items() if v is not None}  # as OpenAI: absent, not null
        of = f"/{self.total_steps}" if self.total_steps else ""
        message = f"Step {held['step']}{of}: training loss={held['train_loss']:.4f}"
        if held["valid_loss"] is not None:
            message += f", validation loss={held['valid_loss']:.4f}"
        return [MetricsEvent(held["step"], message, data)]

    def _new_records(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # rewritten by a resume: read again from the top (steps already seen are skipped)
            self.offset = 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only: the run may be writing the next one
        self.offset += end
        records = []
        for line in chunk[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records
