"""Where a run's numbers go: `metrics.jsonl`, TensorBoard (`tb/`), MLflow or W&B, `samples.jsonl`, a progress bar.

    tensorboard --logdir runs/<name>/tb
    MLFLOW_TRACKING_URI=file://$PWD/mlruns gemcut train examples/sft_chatterbot.yaml "train.report_to=[tensorboard,mlflow]"

Every record is one JSON line in `metrics.jsonl` (training lines carry `loss`, `lr`, `grad_norm`,
`tokens_per_s`; evaluation lines carry `val_*` metrics) and the same scalars in TensorBoard. On resume the
lines after the checkpoint's step are dropped (and TensorBoard purges them), so the files read as one run.
In a terminal a rich progress bar shows loss, learning rate, trained tokens/s and the ETA; elsewhere (a
log file, the job worker) a plain line is printed about every 5% of the run and at each evaluation.

`train.report_to` (read from the run's `config.yaml`) picks the trackers: TensorBoard is written by
gemcut itself (as above); `mlflow` and `wandb` go through accelerate's tracker classes
(`accelerate.tracking.MLflowTracker`, `WandBTracker`; `pip install 'gemcut[tracking]'`). They get the
run's config as hyperparameters once, then the same scalars as TensorBoard (`train/loss`, `val_loss`, ...)
at each log step and validation. Their run ids are kept in `trackers.json` in the run folder, so a resumed
run logs into the same MLflow run and W&B run (neither can delete points, so steps between the checkpoint
and the interruption appear twice in MLflow; W&B ignores steps below its last). Where they go is theirs to
say: `MLFLOW_TRACKING_URI` and `MLFLOW_EXPERIMENT_NAME` (default experiment `gemcut`); `WANDB_PROJECT`
(default `gemcut`), `WANDB_MODE=offline`, `WANDB_DIR`. The run's name is the run folder's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gemcut.errors import GemcutError

TRACKERS_FILE = "trackers.json"  # {"mlflow": {"run_id": ...}, "wandb": {"id": ...}}: what a resume continues
PACKAGE = {"mlflow": "mlflow", "wandb": "wandb"}


def _truncate_jsonl(path: Path, last_step: int) -> float:
    """Keep the records up to `last_step` (what the resumed checkpoint holds); returns the last kept `elapsed_s`."""
    if not path.is_file():
        return 0.0
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
    return max((json.loads(line).get("elapsed_s", 0.0) for line in kept), default=0.0)


def _scalars(record: dict) -> dict[str, float]:
    """The numbers of a record as trackers name them: `train/<key>`, or `val_*` as they are."""
    return {key if key.startswith("val_") else f"train/{key}": value for key, value in record.items()
            if key not in ("step", "elapsed_s", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
    return out


def _run_config(run_dir: Path) -> dict:
    """The resolved config `gemcut train` wrote into the run folder before the loop; {} when there is none."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def open_trackers(names: list[str], run_dir: Path, config: dict, *, resumed: bool) -> list:
    """Started accelerate trackers for `names` (mlflow, wandb), continuing the runs in `trackers.json` when
    `resumed`. Raises GemcutError naming the package to install when one is missing."""
    missing = [PACKAGE[n] for n in names if importlib.util.find_spec(PACKAGE[n]) is None]
    if missing:
        raise GemcutError(
            f"train.report_to asks for {', '.join(missing)}, which is not installed; install it with "
            f"pip install {' '.join(missing)} (or pip install 'gemcut[tracking]'), or take it out of train.report_to")
    ids_file = run_dir / TRACKERS_FILE
    ids = json.loads(ids_file.read_text()) if resumed and ids_file.is_file() else {}
    trackers = []
    for name in names:
        before = ids.get(name, {})
        try:
            tracker, ids[name] = _start(name, run_dir, before)
        except Exception as e:  # a tracking server that refuses, a store MLflow will not open: say which and why
            for started in trackers:
                started.finish()
            again = f" (continuing its run {before} from {ids_file}; delete that file to start a new one)" if before else ""
            raise GemcutError(f"train.report_to: {name} could not start{again}: {type(e).__name__}: {e}") from None
        if not before:  # a continued run has its hyperparameters already (MLflow refuses to change them)
            tracker.store_init_configuration(_flatten(config) if name == "mlflow" else config)
        trackers.append(tracker)
    if trackers:
        ids_file.write_text(json.dumps(ids, indent=2))
    return trackers


def _start(name: str, run_dir: Path, before: dict):
    """A started tracker and the ids that reopen its run (`before`: the ids of the run to continue)."""
    if name == "mlflow":
        from accelerate.tracking import MLflowTracker

        tracker = MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "gemcut"),
                                run_id=before.get("run_id"), run_name=run_dir.name,
                                tags={"gemcut.run_dir": str(run_dir.resolve())})
        tracker.start()
        return tracker, {"run_id": tracker.tracker.info.run_id}
    from accelerate.tracking import WandBTracker

    run_id = before.get("id") or uuid.uuid4().hex[:12]
    tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "gemcut"), name=run_dir.name, id=run_id, resume="allow")
    tracker.start()
    return tracker, {"id": run_id}


class RunLogger:
    """Writes metrics, samples and TensorBoard scalars (and MLflow, W&B: `train.report_to`) for one run;
    `start_step` > 0 means resumed. `config` is the run's config (dict); None reads the run folder's
    `config.yaml`, and without one only TensorBoard is written."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool | None = None, console: Console | None = None, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = _run_config(self.run_dir) if config is None else config
        report_to = list(config.get("train", {}).get("report_to", ["tensorboard"]))
        tensorboard = tensorboard and "tensorboard" in report_to
        self.console = console or Console(stderr=True)
        self._trackers = []
        if int(os.environ.get("RANK", "0")) == 0:  # one process reports (W&B would open a run per process)
            self._trackers = open_trackers([n for n in report_to if n != "tensorboard"], self.run_dir, config,
                                           resumed=start_step > 0)
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
        scalars = _scalars(record)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        for tracker in self._trackers:
            tracker.log(scalars, step=step)
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
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []


class SilentLogger:
    """What the processes other than the main one log to: nothing (one process writes the run folder)."""

    def print(self, text: str) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def samples(self, step: int, samples: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass
