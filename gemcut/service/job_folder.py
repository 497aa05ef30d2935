"""What a worker puts into a job's run folder before training, and reads out of it afterwards.

    python -m pytest -q tests/test_service_workers.py

    path = write_job_config(job, layout)        # <run_dir>/job_config.yaml: the job's config, paths resolved
    planned_steps(job.config, run_dir)         # the loop's step count, once data_report.json exists
    job_error(run_dir / "job.log", layout, job) # {code, message, param} from the run's own error line
    result_rows(run_dir)                        # the per-step CSV rows of the result file

Only the worker turns file ids into paths (`layout.file_path`): the job's config holds ids, never paths a
client chose. The paths are relative to the run folder, where the children run (`../../files/file-…`), so
the config is the same on every machine that mounts the service folder, wherever it mounts it: a job
started on one worker resumes on another (`--resume` refuses a config that changed). Uploaded files are
stored under their id, without a suffix, so the format is set to JSONL (the format of every fine-tuning
file) unless the config names one.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
from pathlib import Path

import yaml

from gemcut.service.db import JobRow
from gemcut.service.layout import ServiceLayout

JOB_CONFIG = "job_config.yaml"
JOB_LOG = "job.log"
EVAL_LOG = "eval.log"
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
CONFIG_KEY = re.compile(r"\b((?:data|model|adapter|objective|train|eval|output)(?:\.[a-z_0-9]+)+)")
ERROR_LINE = "error: "
ATTEMPT_MARK = "==== "  # the line the worker writes into a log before each child it starts
MAX_MESSAGE = 2000


def file_in_run(layout: ServiceLayout, job: JobRow, file_id: str) -> str:
    """An uploaded file's path as the job's children see it from the run folder (their working directory)."""
    return os.path.relpath(layout.file_path(file_id), layout.run_dir(job.id))


def job_config(job: JobRow, layout: ServiceLayout, *, threads: int | None = None) -> dict:
    """The run config the job trains with, run in the run folder: `job.config` with the data files and the run
    folder filled in (relative to the run folder), and `threads` unless the config sets train.num_threads."""
    config = copy.deepcopy(job.config)
    data = config.setdefault("data", {})
    data["train"] = [file_in_run(layout, job, job.training_file)]
    if job.validation_file:
        data["validation"] = [file_in_run(layout, job, job.validation_file)]
    if data.get("format", "auto") == "auto":
        data["format"] = "jsonl"
    config["output"] = {**config.get("output", {}), "dir": "..", "name": job.id}
    train = config.setdefault("train", {})
    if threads and not train.get("num_threads"):
        train["num_threads"] = threads
    return config


def write_job_config(job: JobRow, layout: ServiceLayout, *, threads: int | None = None) -> Path:
    """Write `<run_dir>/job_config.yaml` (the same bytes on every attempt, so `--resume` sees the same config)."""
    run_dir = layout.run_dir(job.id)
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = run_dir / JOB_CONFIG
    path.write_text(yaml.safe_dump(job_config(job, layout, threads=threads), sort_keys=False), encoding="utf-8")
    return path


def planned_steps(config: dict, run_dir: Path) -> int | None:
    """The optimizer steps the run will make (the loop's own count: train.max_steps, or epochs over the training
    examples in batches of train.batch_size); None until `gemcut train` has written data_report.json."""
    train = config.get("train", {})
    if train.get("max_steps"):
        return int(train["max_steps"])
    report = run_dir / "data_report.json"
    try:
        examples = json.loads(report.read_text(encoding="utf-8"))["tokenization"]["train"]["examples"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(1, math.ceil(float(train.get("epochs", 1.0)) * math.ceil(examples / int(train.get("batch_size", 8)))))


def keep_metrics_through(run_dir: Path, step: int) -> None:
    """Drop the metrics.jsonl lines after `step` (what `gemcut train --resume` from that step does itself, so that
    the worker reading the file and the run rewriting it agree on its bytes)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except ValueError:  # a line cut short by the kill
            continue
    path.write_text("".join(kept), encoding="utf-8")


def job_error(log: Path, layout: ServiceLayout, job: JobRow, exit_code: int) -> dict:
    """OpenAI's `error` object for a run that failed: the run's own error text from its log (gemcut prints one
    `error: ...` naming the file, line, field and fix), with the server's paths of the job's files shown as
    their file ids. `code` is invalid_training_file / invalid_validation_file for a data error in that file,
    else training_failed; `param` the file or the config key the message names."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    lines = [line.rstrip() for line in text.splitlines()]
    marks = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT_MARK)]
    lines = lines[marks[-1] + 1:] if marks else lines  # this attempt's output only
    starts = [i for i, line in enumerate(lines) if line.startswith(ERROR_LINE)]
    if starts:
        message = "\n".join(lines[starts[-1]:]).removeprefix(ERROR_LINE).strip()
    else:  # not one of gemcut's own errors: the last line, the exception's type and message, never the traceback
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        how = f"was killed by signal {-exit_code}" if exit_code < 0 else f"exited with status {exit_code}"
        message = f"training {how}" + (f": {last}" if last else "")
    code, param = "training_failed", None
    for field, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
        if not file_id:
            continue
        paths = [str(layout.file_path(file_id)), file_in_run(layout, job, file_id)]
        if any(path in message for path in paths):
            for path in paths:
                message = message.replace(path, file_id)
            code, param = f"invalid_{field}", field
            break
    if param is None and (key := CONFIG_KEY.search(message)):
        param = key.group(1)
    return {"code": code, "message": message[:MAX_MESSAGE], "param": param}


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records (a line cut short at the end is left out)."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def result_rows(run_dir: Path) -> list[dict]:
    """One row per training step logged: OpenAI's result-file columns (the validation numbers on the steps that
    were validated)."""
    rows: dict[int, dict] = {}
    for record in read_records(run_dir):
        step = record.get("step")
        if "loss" in record:
            rows[step] = {"step": step, "train_loss": record["loss"], "train_accuracy": record.get("mean_token_accuracy"),
                          "valid_loss": None, "valid_mean_token_accuracy": None}
        elif "val_loss" in record and step in rows:
            rows[step].update(valid_loss=record["val_loss"], valid_mean_token_accuracy=record.get("val_mean_token_accuracy"))
    return [rows[step] for step in sorted(rows)]


def result_csv(run_dir: Path) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in result_rows(run_dir):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue().encode("utf-8")


def trained_tokens(run_dir: Path) -> int | None:
    """Every token of every example the run trained on, prompts included, over all epochs (the manifest's
    `tokens`): what OpenAI bills as trained tokens."""
    try:
        return int(json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def eval_headline(run_dir: Path) -> dict | None:
    """The base-vs-tuned headline of the run's eval.json, or None when there is none."""
    try:
        ev = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    metric = ev.get("headline_metric")
    return {"text": ev.get("headline"), "metric": metric, "tuned": (ev.get("tuned") or {}).get(metric),
            "base": (ev.get("base") or {}).get(metric), "split": ev.get("split"), "n_examples": ev.get("n_examples"),
            "report": "report.html" if (run_dir / "report.html").is_file() else None}
