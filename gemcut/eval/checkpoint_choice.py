"""Checkpoint choice: evaluate every kept checkpoint of a run and mark the best by a metric.

    gemcut eval runs/<name> --select-checkpoint [--metric macro_f1]
    python -m pytest -q tests/test_eval_run.py -k select_checkpoint

The training loop keeps `checkpoints/best` by its own validation metric; this scores each complete
checkpoint on a split with the evaluation's metrics (which may be other than the loop's, e.g. macro-F1 of
generated labels), writes `checkpoints.json`, and says whether `final/` holds the best one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from gemcut.config import RunConfig
from gemcut.errors import GemcutError
from gemcut.eval.evaluate import run_config
from gemcut.eval.examples import read_split, split_labels, to_example
from gemcut.eval.model_views import tuned_model
from gemcut.eval.outputs import write_json
from gemcut.eval.summary import HEADLINE, LOWER_IS_BETTER, summarise
from gemcut.eval.task_scoring import Progress, eval_task, no_progress, score_model
from gemcut.run_folder import best_checkpoint, complete_checkpoints
from gemcut.tasks import Task, task_named


def _final_step(run_dir: Path) -> int | None:
    """The step whose weights final/ holds: the run manifest's `final_from` ("last" = the last step, or "step-N")."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    source = manifest.get("final_from")
    if isinstance(source, str) and source.startswith("step-") and source[5:].isdigit():
        return int(source[5:])
    if source == "last" and isinstance(manifest.get("steps"), int):
        return manifest["steps"]
    return None


def _metric_name(metric: str | None, cfg: RunConfig, run_task: Task, task: str) -> str:
    """A metric of this evaluation: given, or the metric early stopping watches (`RunConfig.watched_metric`,
    the task's own when auto) without its `val_` prefix.

    `loss` is the mean loss of the references, the quantity the training loop logs as `val_loss` (for
    preference data, which has no single reference, the headline metric is used instead).
    """
    name = (metric or cfg.watched_metric(run_task)[0]).removeprefix("val_")
    if name == "loss" and task == "preference":
        return HEADLINE[task]
    return name


def select_checkpoint(run_dir, metric: str | None = None, *, split: str = "validation", max_examples: int | None = None,
                      log: Callable[[str], None] | None = None, progress: Progress | None = None,
                      trust_remote_code: bool = False, overrides: list[str] | None = None) -> dict:
    """Evaluate every kept checkpoint on `split`, mark the best by `metric`, and say which one final/ holds.

    `metric` is a metric name of the task (macro_f1, accuracy, rougeL, perplexity, ...); default: the metric
    the run's early stopping watches. Lower is better for perplexity, higher for the rest. Writes
    `checkpoints.json` into the run folder and returns it: {split, metric, higher_is_better, checkpoints:
    [{name, step, value, best}], best, loop_best (the loop's `checkpoints/best`), final_step, final_is_best}.
    """
    from gemcut.models.load import load_run

    log = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, trust_remote_code, overrides)
    found = complete_checkpoints(run_dir / "checkpoints")
    if not found:
        raise GemcutError(f"{run_dir}/checkpoints: no complete checkpoint to choose from (train with train.save_every or train.eval_every)")
    records = read_split(run_dir, split)[: max_examples or cfg.eval.max_examples or None]
    rows, name, task = [], None, None
    for path in found:
        log(f"evaluating {path.name} on {split}")
        loaded = load_run(run_dir, checkpoint=path.name, trust_remote_code=trust_remote_code)
        labels = split_labels(records, getattr(loaded, "labels", None) or cfg.data.labels)
        examples = [to_example(r, labels=labels, data_cfg=cfg.data) for r in records]
        run_task = task_named(loaded.task)
        task = eval_task(run_task, examples)
        name = _metric_name(metric, cfg, run_task, task)
        with tuned_model(loaded) as tm:
            res = score_model(task, tm, loaded.tokenizer, loaded.template, examples, labels, cfg, log,
                              progress or no_progress, path.name, scorer=run_task.head == "scorer")
        values = summarise(task, [e.reference for e in examples], labels, res, None)["tuned"]
        if name not in values:
            shown = sorted(k for k, v in values.items() if isinstance(v, float))
            raise GemcutError(f"metric {name!r} is not computed for task {task}; choose one of: {', '.join(shown)}")
        rows.append({"name": path.name, "step": int(path.name.split("-", 1)[1]), "value": values[name], "best": False})
        del loaded
    higher = name not in LOWER_IS_BETTER
    finite = [r for r in rows if r["value"] is not None and math.isfinite(r["value"])]
    best = (max if higher else min)(finite, key=lambda r: r["value"]) if finite else None
    if best is not None:
        best["best"] = True
    loop_best = best_checkpoint(run_dir / "checkpoints")
    final_step = _final_step(run_dir)
    out = {"split": split, "metric": name, "higher_is_better": higher, "task": task, "checkpoints": rows,
           "best": best["name"] if best else None, "loop_best": loop_best.name if loop_best else None,
           "final_step": final_step, "final_is_best": (best is not None and final_step == best["step"]) if final_step is not None else None}
    write_json(run_dir / "checkpoints.json", out)
    return out
