"""The forgetting check: did tuning cost general ability? Tuned vs base on held-out general examples.

    python -m pytest -q tests/test_eval_run.py -k forgetting

For a causal LM, `forgetting_check` measures perplexity on general held-out conversations
(`eval.forgetting_data`, default the packaged chatterbot corpus) before (base) and after (tuned); where that
set carries answers (label records, or prompt/completion pairs), also task accuracy (accuracy, or exact
match); and warns when the tuned model is worse on either by more than `eval.forgetting_margin` (a relative
change). It is skipped for classifier heads (no language model to measure), without the base model, and
when the set is part of the run's training data (perplexity there can only fall).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from gemcut.config import RunConfig
from gemcut.errors import GemcutError
from gemcut.eval import scoring
from gemcut.eval.examples import Example, to_example
from gemcut.eval.model_views import base_model, tuned_model
from gemcut.eval.summary import ModelResults, summarise
from gemcut.eval.task_scoring import Progress, no_progress, reference_targets, score_model
from gemcut.tasks import task_named


def forgetting_examples(spec: str, *, limit: int = 200, data_cfg=None) -> tuple[list[Example], dict]:
    """General held-out examples from a packaged alias or a file/folder (any format gemcut reads).

    Conversations need an assistant turn after a prompt; other records are counted, not scored. `label`
    records are asked with `data_cfg`'s instruction (the run's) over the labels found in the file. When there
    are more than `limit`, evenly spaced ones are taken (so every topic file of a corpus is represented).
    Returns the examples and counts {unusable, used}.
    """
    from gemcut.data.assets import resolve_source
    from gemcut.data.readers import read_source
    from gemcut.data.records import record_kind

    values, unusable = [], 0
    for row in read_source(resolve_source(spec), display=spec):
        value = row.value if row.error is None else None
        if isinstance(value, dict) and {"messages", "completion", "text"} & set(value):
            values.append({**value, "_source": row.source})
        else:
            unusable += 1
    labels = sorted({str(v["label"]) for v in values if "label" in v and "text" in v})
    usable = []
    for value in values:
        try:
            if record_kind(value) == "preference":
                raise GemcutError("a preference pair has no single reference to score")
            usable.append(to_example(value, labels=labels, data_cfg=data_cfg))
        except GemcutError:
            unusable += 1
    if len(usable) > limit:
        step = len(usable) / limit
        usable = [usable[int(i * step)] for i in range(limit)]
    return usable, {"unusable": unusable, "used": len(usable)}


# Record kinds whose reference is an answer to get right, and the metric the forgetting check compares:
# labelled examples are a task with one right label, prompt/completion pairs a task with one right answer.
# Conversations (chit-chat) have many good answers, so only their perplexity is compared.
FORGETTING_TASKS = {"label": ("generative_classification", "accuracy"), "prompt_completion": ("generation", "exact_match")}


def forgetting_check(loaded, cfg: RunConfig, *, with_base: bool, log: Callable[[str], None],
                     progress: Progress = no_progress) -> dict | None:
    """Perplexity on general held-out examples, tuned vs base, and whether it rose by more than the margin;
    where the examples carry answers (FORGETTING_TASKS), task accuracy too, and whether it fell by more."""
    spec = cfg.eval.forgetting_data
    if spec is None:
        return {"skipped": "eval.forgetting_data is None"}
    if in_training_data(spec, cfg.data.training_sources()):  # data.train, or every source of a data mixture
        # Perplexity on what the run trained on can only fall: it would hide forgetting, and costs half of eval.
        why = (f"eval.forgetting_data={spec} is part of this run's training data (data.train), so it measures fit, not "
               "forgetting; pass eval.forgetting_data=chitchat (or another set the run did not train on) or eval.forgetting_data=none")
        return {"skipped": why, "warning": why, "in_training_data": True}
    if task_named(loaded.task).classifier:
        return {"skipped": "a classifier head has no language-model perplexity to compare"}
    if not with_base:
        return {"skipped": "needs the base model (run without --no-base)"}
    examples, counts = forgetting_examples(spec, limit=cfg.eval.forgetting_max_examples, data_cfg=cfg.data)
    if not examples:
        return {"skipped": f"{spec}: no conversations with an assistant turn to score ({counts['unusable']} unusable records)"}
    log(f"forgetting check: perplexity on {len(examples)} examples of {spec}")
    targets = [reference_targets(e, loaded.tokenizer, loaded.template, cfg.data.max_length) for e in examples]
    ids, masks = [t[0] for t in targets], [t[1] for t in targets]
    size = cfg.eval.batch_size
    with tuned_model(loaded) as tm:
        tuned = ModelResults(nll=scoring.sequence_nll(tm, ids, masks, batch_size=size,
                                                      progress=progress("tuned: general perplexity", len(ids))))
    with base_model(loaded, cfg) as bm:
        base = ModelResults(nll=scoring.sequence_nll(bm, ids, masks, batch_size=size,
                                                     progress=progress("base: general perplexity", len(ids))))
    s = summarise("language_modeling", [e.reference for e in examples], [], tuned, base,
                  n_resamples=cfg.eval.bootstrap, seed=cfg.train.seed)
    before, after = s["base"]["perplexity"], s["tuned"]["perplexity"]
    rise = after / before - 1 if before and math.isfinite(before) else float("nan")
    out = {"data": spec, "n": len(examples), "unusable_records": counts["unusable"], "in_training_data": False,
           "tokens": s["tuned"]["nll_tokens"], "perplexity_base": before,
           "perplexity_tuned": after, "relative_change": rise, "margin": cfg.eval.forgetting_margin,
           "delta": s["deltas"]["perplexity"], "warning": None, "task": None}
    warnings = []
    if math.isfinite(rise) and rise > cfg.eval.forgetting_margin:
        warnings.append(f"general perplexity rose {rise:+.1%} on {spec} ({before:.2f} -> {after:.2f}), more than "
                        f"eval.forgetting_margin={cfg.eval.forgetting_margin:.0%}")
    out["task"] = forgetting_task(loaded, cfg, examples, log=log, progress=progress)
    if out["task"] and (out["task"]["relative_change"] or 0.0) < -cfg.eval.forgetting_margin:
        t = out["task"]
        warnings.append(f"{t['metric']} on {spec} fell {t['relative_change']:+.1%} ({t['base']:.3f} -> {t['tuned']:.3f}), "
                        f"more than eval.forgetting_margin={cfg.eval.forgetting_margin:.0%}")
    if warnings:
        out["warning"] = ("; ".join(warnings) + ": the tuned model may have forgotten general ability; "
                          "try fewer epochs, a lower lr, or a smaller LoRA rank")
    return out


def in_training_data(spec: str, train: list[str]) -> bool:
    """Whether the forgetting set is one of the run's training sources: the same alias, the same file or
    folder, or a file inside a training folder."""
    target = Path(spec).expanduser()
    for source in train:
        if source == spec:
            return True
        folder = Path(source).expanduser()
        if target.exists() and folder.exists():
            resolved = target.resolve()
            if resolved == folder.resolve() or folder.resolve() in resolved.parents:
                return True
    return False


def forgetting_task(loaded, cfg: RunConfig, examples: list[Example], *, log: Callable[[str], None],
                    progress: Progress) -> dict | None:
    """Task accuracy of base and tuned on the general examples that carry answers, or None when none do."""
    kinds = {e.kind for e in examples}
    if len(kinds) != 1 or next(iter(kinds)) not in FORGETTING_TASKS:
        return None
    task, metric = FORGETTING_TASKS[next(iter(kinds))]
    labels = sorted({e.label for e in examples if e.label is not None})
    log(f"forgetting check: {metric} on {len(examples)} answered examples")

    def score(model, name: str) -> ModelResults:
        return score_model(task, model, loaded.tokenizer, loaded.template, examples, labels, cfg, log,
                           progress, name=f"{name}: general {metric}")

    with tuned_model(loaded) as tm:
        tuned = score(tm, "tuned")
    with base_model(loaded, cfg) as bm:
        base = score(bm, "base")
    s = summarise(task, [e.reference for e in examples], labels, tuned, base, n_resamples=cfg.eval.bootstrap,
                  seed=cfg.train.seed)
    before, after = s["base"][metric], s["tuned"][metric]
    return {"metric": metric, "base": before, "tuned": after, "delta": s["deltas"][metric],
            "relative_change": after / before - 1 if before else None}  # no relative change from zero
