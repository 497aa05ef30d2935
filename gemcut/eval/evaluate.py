"""Evaluate a run folder: the tuned model against its base, a forgetting check, eval.json and report.html.

    gemcut eval runs/<name> [--split test] [--checkpoint final|best|last|step-N] [--no-base] [--max-examples N]
    python -c "import gemcut; print(gemcut.evaluate('runs/<name>')['headline'])"

Reads the run's `config.yaml` and its prepared `data/<split>.jsonl`, loads the chosen checkpoint with
`gemcut.models.load.load_run`, and puts the parts together:

1. the evaluation task from the run's task table row and the record kind (task_scoring.py: `eval_task`);
2. the tuned model, then the base model (model_views.py: a LoRA run's adapter merged, then switched off),
   each scored by `task_scoring.score_model` in the run's compute precision (gemcut/models/precision.py);
3. per-metric tuned-minus-base differences with paired bootstrap intervals (summary.py, bootstrap.py,
   `eval.bootstrap` resamples, seed `train.seed`);
4. the baselines of `eval.baselines` (baselines.py: the base model prompted zero- and k-shot, scored by constrained
   label likelihood on label tasks, and TF-IDF + logistic regression on the train split), each against the tuned
   model with a paired bootstrap interval (baseline_summary.py); the headline is the margin over the strongest;
5. the forgetting check (forgetting.py);
6. outputs in the run folder (outputs.py): `eval.json` (everything shown), `eval_predictions.jsonl` (one line
   per example: reference, base and tuned answers) and `report.html` (report.py).

Choosing among a run's checkpoints is checkpoint_choice.py (`gemcut eval --select-checkpoint`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gemcut.config import RunConfig, load_config
from gemcut.errors import ConfigError, GemcutError
from gemcut.eval import baselines as B
from gemcut.eval.baseline_summary import best_baseline, compare_baselines, margin_headline
from gemcut.eval.examples import read_split, split_labels, to_example
from gemcut.eval.forgetting import forgetting_check
from gemcut.eval.model_views import base_model, causal_base_model, causal_base_of, is_lora, tuned_model
from gemcut.eval.outputs import clean_floats, predictions_lines, samples, write_json, write_jsonl
from gemcut.eval.per_source import per_source_metrics
from gemcut.eval.summary import headline_text, summarise
from gemcut.eval.task_scoring import Progress, eval_task, no_progress, score_model
from gemcut.models.numerics import device_of
from gemcut.models.precision import autocast, resolve_precision
from gemcut.tasks import task_named


def compute_precision(model, cfg: RunConfig):
    """(name, context factory): evaluation computes in the precision the run trained in (train.precision),
    so bf16 autocast where the hardware has it, for both the tuned and the base model."""
    device = device_of(model)
    precision = resolve_precision(cfg.train.precision, device)
    return precision, lambda: autocast(precision, device)


def run_config(run_dir: Path, trust_remote_code: bool = False, overrides: list[str] | None = None) -> RunConfig:
    """The run's resolved config with `eval.*` overrides, remote code allowed only by the caller (never by the
    folder). Other sections are what the run was trained with and cannot change here."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise GemcutError(f"{run_dir}: not a run folder (no config.yaml); pass the folder `gemcut train` created under runs/")
    for text in overrides or []:
        if not text.strip().startswith("eval."):
            raise ConfigError(f"override {text!r}: gemcut eval changes eval.* settings only (for example "
                              "eval.forgetting_data=none); the other sections are what the run was trained with")
    cfg = load_config(path, overrides)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"trust_remote_code": trust_remote_code})})


def evaluate(run_dir, *, split: str = "test", checkpoint: str = "final", base: bool = True, max_examples: int | None = None,
             forgetting_data: str | None = None, report: bool = True, log: Callable[[str], None] | None = None,
             progress: Progress | None = None, trust_remote_code: bool = False, overrides: list[str] | None = None) -> dict:
    """Evaluate `run_dir` on `split`; write eval.json, eval_predictions.jsonl and report.html; return eval.json's dict.

    Args:
        split: prepared split to score (data/<split>.jsonl).
        checkpoint: "final", "best", "last" or "step-N" (see gemcut.models.load.load_run).
        base: also score the base model and compute differences with bootstrap intervals (and the
            forgetting check); the run's `eval.compare_base` is the default the CLI passes.
        max_examples: score only the first N examples (default eval.max_examples); the count left out is recorded.
        forgetting_data: the general held-out set of the forgetting check, instead of the run's eval.forgetting_data.
        report: write report.html.
        log: called with one line per stage (the CLI prints them).
        progress: `progress(stage, total)` -> `advance(n)`, for a progress bar over each scoring pass.
        trust_remote_code: let Python files shipped in the run (or base) folder run; the folder cannot.
        overrides: `eval.key=value` strings applied to the run's eval section (as `gemcut eval RUN k=v`).
    """
    from gemcut.models.load import load_run

    log = log or (lambda _msg: None)
    progress = progress or no_progress
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, trust_remote_code, overrides)
    if forgetting_data is not None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"forgetting_data": forgetting_data})})
    t_start = time.time()
    records = read_split(run_dir, split)
    n_total = len(records)
    limit = max_examples or cfg.eval.max_examples
    if limit is not None:
        records = records[:limit]
    if not records:
        raise GemcutError(f"{run_dir}/data/{split}.jsonl has no records to evaluate")
    log(f"loading {run_dir} ({checkpoint})")
    loaded = load_run(run_dir, checkpoint=checkpoint, trust_remote_code=trust_remote_code)
    labels = split_labels(records, getattr(loaded, "labels", None) or cfg.data.labels)
    examples = [to_example(r, labels=labels, data_cfg=cfg.data) for r in records]
    run_task = task_named(loaded.task)
    task = eval_task(run_task, examples)
    scorer = run_task.head == "scorer"
    unknown = [e for e in examples if e.label is not None and e.label not in labels]
    if unknown:
        raise GemcutError(f"{unknown[0].source}: label {unknown[0].label!r} is not one the model was trained on ({', '.join(labels)}); "
                          f"{len(unknown)} {split} records have such labels; re-prepare the data with data.labels covering them")
    references = [e.reference for e in examples]

    precision, compute = compute_precision(loaded.model, cfg)
    log(f"task {task}: scoring the tuned model on {len(examples)} {split} examples ({precision})")
    with compute(), tuned_model(loaded) as tm:
        tuned = score_model(task, tm, loaded.tokenizer, loaded.template, examples, labels, cfg, log, progress, "tuned",
                            scorer=scorer)
    wanted, skipped = B.wanted(task, cfg), {}
    train_examples: list = []
    train_records: list = []
    val_records: list = []
    if wanted:
        try:
            train_examples, train_records, val_records = B.train_data(run_dir, examples[0].kind, labels, cfg)
        except GemcutError as e:
            skipped = {name: str(e) for name in wanted}
            wanted = []
    found: list[B.Baseline] = []
    base_res = None
    if base:
        log("scoring the base model" + (" (adapter disabled)" if is_lora(loaded.model) else ""))
        with base_model(loaded, cfg) as bm, compute():
            base_res = score_model(task, bm, loaded.tokenizer, loaded.template, examples, labels, cfg, log, progress, "base",
                                   scorer=scorer)
            if task != "classification":
                found += B.prompted_baselines(task, wanted, bm, loaded.tokenizer, loaded.template, examples, train_examples,
                                              base_res, labels, cfg, log, progress)
    prompted = [n for n in wanted if n in ("zero_shot", "k_shot")]
    if prompted and not base:
        skipped.update({n: "the base model was not scored (--no-base, eval.compare_base=false)" for n in prompted})
    elif prompted and task == "classification":
        why_not = causal_base_of(cfg)
        if why_not is not None:
            skipped.update({n: f"{why_not}; TF-IDF is the baseline" for n in prompted})
        else:
            log("scoring the prompted baselines with the base model loaded as a causal LM")
            with causal_base_model(cfg, device_of(loaded.model)) as (lm, lm_tokenizer, lm_template), compute():
                found += B.prompted_baselines(task, prompted, lm, lm_tokenizer, lm_template, examples, train_examples,
                                              None, labels, cfg, log, progress)
    if "tfidf" in wanted:
        log("fitting the TF-IDF baseline on the train split")
        try:
            found.append(B.tfidf_baseline(examples, train_records, val_records, labels, cfg.train.seed))
        except ValueError as e:
            skipped["tfidf"] = str(e)
    summary = summarise(task, references, labels, tuned, base_res, n_resamples=cfg.eval.bootstrap, seed=cfg.train.seed)
    baselines = compare_baselines(task, references, labels, tuned, found, n_resamples=cfg.eval.bootstrap, seed=cfg.train.seed)
    best = best_baseline(summary, baselines) if baselines else None
    judged = None
    if cfg.eval.judge and task == "generation":
        from gemcut.eval.judge import judge_baselines

        log(f"judging tuned against baseline answers with the reward model {cfg.eval.judge}")
        with compute():
            judged = judge_baselines(cfg.eval.judge, device_of(loaded.model), examples, tuned.texts,
                                     {b.name: b.results.texts for b in found if b.results.texts is not None},
                                     batch_size=cfg.eval.batch_size, n_resamples=cfg.eval.bootstrap, seed=cfg.train.seed,
                                     trust_remote_code=trust_remote_code, progress=progress)
    elif cfg.eval.judge:
        skipped["judge"] = f"eval.judge applies to generation tasks; this is {task}"
    for b in baselines.values():
        log(f"  baseline {b['title']}: {summary['headline_metric']} {b['metrics'].get(summary['headline_metric'])}")
    with compute():
        forgetting = forgetting_check(loaded, cfg, with_base=base, log=log, progress=progress)

    result = {
        "run": str(run_dir), "split": split, "checkpoint": checkpoint, "task": task, "labels": labels if summary["tuned"].get("per_class") else None,
        "n_examples": len(examples), "n_in_split": n_total, "n_left_out": n_total - len(examples), "precision": precision,
        "headline": margin_headline(summary, best) if best else headline_text(summary), **summary,
        "baselines": baselines, "baselines_skipped": skipped, "best_baseline": best, "judge": judged, "forgetting": forgetting,
        "samples": samples(examples, tuned, base_res, cfg.eval.num_samples),
        "generation": {"max_new_tokens": tuned.extra.get("max_new_tokens"), "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
                       "finish_reasons": {"tuned": tuned.extra.get("finish_reasons"),
                                          "base": base_res.extra.get("finish_reasons") if base_res else None}},
        "warnings": [], "seconds": None,
    }
    if forgetting and forgetting.get("warning"):
        result["warnings"].append(forgetting["warning"])
    for name, r in (("tuned", summary["tuned"]), ("base", summary["base"])):
        if r and r.get("unparseable"):
            result["warnings"].append(f"{name}: {r['unparseable']} of {r['n']} answers matched no label; they count as wrong "
                                      "(see the 'unparseable' column of the confusion matrix)")
    per_task = per_source_metrics(records, references, tuned, base_res, cfg, run_dir)  # a data mixture's tasks, each by its metric
    if per_task is not None:
        result["per_source"] = per_task
    result["seconds"] = round(time.time() - t_start, 2)
    result = clean_floats(result)
    write_json(run_dir / "eval.json", result)
    write_jsonl(run_dir / "eval_predictions.jsonl", predictions_lines(examples, tuned, base_res,
                                                                       {b.name: b.results for b in found if b.results is not base_res}))
    if report:
        from gemcut.eval.report import write_report

        write_report(run_dir, result)
    log(f"wrote {run_dir / 'eval.json'}" + (f" and {run_dir / 'report.html'}" if report else ""))
    return result
