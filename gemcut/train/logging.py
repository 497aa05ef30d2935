"""Where a run's numbers go: `metrics.jsonl`, TensorBoard (`tb/`), `samples.jsonl`, and a progress bar.

    tensorboard --logdir runs/<name>/tb

Every record is one JSON line in `metrics.jsonl` (training lines carry `loss`, `lr`, `grad_norm`,
`tokens_per_s`; evaluation lines carry `val_*` metrics) and the same scalars in TensorBoard. On resume the
lines after the checkpoint's step are dropped (and TensorBoard purges them), so the files read as one run.
In a terminal a rich progress bar shows loss, learning rate, trained tokens/s and the ETA; elsewhere (a
log file, the job worker) a plain line is printed about every 5% of the run and at each evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _truncate_jsonl(path: Path, last_step: int) -> float:
    """Keep the records up to `last_step` (what the resumed checkpoint holds); returns the last kept `elapsed_s`."""
    if not path.is_file():
        return 0.0
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
    return max((json.loads(line).get("elapsed_s", 0.0) for line in kept), default=0.0)


class RunLogger:
    """Writes metrics, samples and TensorBoard scalars for one run; `start_step` > 0 means resumed."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool | None = None, console: Console | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        elapsed_before = 0.0  # a resumed run's elapsed_s goes on from its checkpoint's
        for path in (self.metrics_path, self.samples_path):
            if start_step > 0:
                elapsed_before = max(elapsed_before, _truncate_jsonl(path, start_step))
            elif path.exists():
                path.unlink()
        self._metrics = self.metrics_path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.console = console or Console(stderr=True)
        self.total_steps = total_steps
        self._print_every = max(1, total_steps // 20)
        show_bar = self.console.is_terminal if progress is None else progress
        self._progress = None
        if show_bar:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-", lr="-", tps="-")
            self._progress.start()
        self._t0 = time.time() - elapsed_before
        if start_step > 0:
            self.print(f"resumed from step {start_step} (metrics.jsonl and elapsed_s continue from there)")

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def log(self, record: dict) -> None:
        """One metrics record; `record["step"]` is the optimizer step it belongs to."""
        record = {**record, "elapsed_s": round(time.time() - self._t0, 3)}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "elapsed_s", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key if key.startswith("val_") else f"train/{key}", value, step)
        is_eval = any(k.startswith("val_") for k in record)
        if self._progress is not None:
            if "loss" in record:
                self._progress.update(self._task, completed=step, loss=f"{record['loss']:.4f}",
                                      lr=f"{record['lr']:.2e}", tps=f"{record.get('tokens_per_s', 0):.0f}")
            if is_eval:
                self._progress.console.print(self._describe(record), highlight=False)
        elif is_eval or step % self._print_every == 0 or step == self.total_steps:
            self.print(self._describe(record))

    @staticmethod
    def _describe(record: dict) -> str:
        parts = [f"step {record['step']}"]
        for key, value in record.items():
            if key in ("step", "elapsed_s", "split", "tokens_total", "trained_tokens_total"):
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return "  ".join(parts)

    def samples(self, step: int, samples: list[dict]) -> None:
        """Generated samples at an evaluation (SFT): one JSON line each in samples.jsonl."""
        with self.samples_path.open("a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
        if self._tb is not None and samples:
            text = "\n\n".join(f"**prompt:** {s.get('prompt', '')}\n\n**output:** {s.get('output', '')}" for s in samples)
            self._tb.add_text("samples", text, step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()
