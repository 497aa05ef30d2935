"""Evaluate a run folder: the tuned model against its base, a forgetting check, eval.json and report.html.

    gemcut eval runs/<name> [--split test] [--checkpoint final|best|last|step-N] [--no-base] [--max-examples N]
    python -c "import gemcut; print(gemcut.evaluate('runs/<name>')['headline'])"

Reads the run's `config.yaml` and its prepared `data/<split>.jsonl`, loads the chosen checkpoint with
`gemcut.models.load.load_run`, and scores it by task (chosen from the record kind and the model):

| task                        | records                       | tuned and base are scored by                       |
|-----------------------------|-------------------------------|----------------------------------------------------|
| `classification`            | label, sequence classifier    | argmax of the logits                               |
| `generative_classification` | label, causal LM              | greedy answer mapped to a label (eval/labels.py)   |
| `generation`                | prompt_completion, messages   | EM/ROUGE/BLEU of the answer, perplexity of the reference |
| `language_modeling`         | text                          | perplexity                                         |
| `preference`                | preference                    | pairwise accuracy (reward score or log-likelihood) |

The base model of a LoRA run is the same model with the adapter switched off (peft `disable_adapter()`),
so no second copy is loaded; other runs load the base weights once more (`load_base`). Each metric's
tuned-minus-base difference gets a paired bootstrap interval (eval.bootstrap resamples, seed train.seed).
For a causal LM the forgetting check measures perplexity on general held-out conversations
(`eval.forgetting_data`, default the packaged chatterbot corpus) before and after; where that set carries
answers (label records, or prompt/completion pairs), also task accuracy (accuracy, or exact match); and warns
when the tuned model is worse on either by more than `eval.forgetting_margin` (a relative change). Outputs, in the run folder: `eval.json`
(everything shown), `eval_predictions.jsonl` (one line per example: reference, base and tuned answers) and
`report.html`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gemcut.config import RunConfig, load_config
from gemcut.errors import ConfigError, GemcutError
from gemcut.eval import scoring
from gemcut.eval.examples import Example, read_split, split_labels, to_example
from gemcut.eval.labels import map_many
from gemcut.eval.summary import ModelResults, headline_text, summarise

# ---------------------------------------------------------------- model plumbing


def unwrap(model):
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sequence_classifier(model) -> bool:
    return type(unwrap(model)).__name__.endswith("ForSequenceClassification")


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def tuned_model(loaded):
    """The tuned model for scoring: a LoRA model with its adapter merged into the weights for the duration.

    The outputs are the adapted model's (up to float rounding) without the adapter's two extra matmuls on
    every adapted layer, a fifth of the forward time of SmolLM2 with LoRA on all linear layers. Unmerging
    subtracts the same product again, so the base weights come back equal up to rounding (about 1e-7
    relative in fp32), which is what the base model is then scored with."""
    model = loaded.model
    if not is_lora(model) or not hasattr(model, "merge_adapter"):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


@contextlib.contextmanager
def base_model(loaded, cfg: RunConfig):
    """The base model for comparison: the adapter-disabled model for LoRA runs, else a fresh load of the base."""
    model = loaded.model
    if is_lora(model):
        with model.disable_adapter():
            yield model
        return
    import torch

    from gemcut.models.load import load_base

    # A classifier's base gets a freshly initialised head; seeding makes that head the same on every evaluation.
    torch.manual_seed(cfg.train.seed)
    task = loaded.task
    base, _ = load_base(cfg.model, task, label_names=loaded.labels if task == "classify" else None)
    base.to(next(model.parameters()).device)
    base.eval()
    try:
        yield base
    finally:
        del base


def reference_targets(example: Example, tokenizer, template, max_length: int, response: str | None = None) -> tuple[list[int], list[bool]]:
    """(ids, target mask) for the NLL of the example's reference (or of `response`) given its prompt.

    With a prompt, the conversation is rendered by the run's template and the targets are the tokens the
    template gives loss weight in training (the answer and its end-of-turn token), after the prompt; so
    evaluation perplexity and training loss measure the same tokens. Plain text: every token after the
    first. Sequences longer than `max_length` are cut at the end, like training data.
    """
    answer = example.reference if response is None else response
    if example.prompt is None:
        ids = list(tokenizer(answer, add_special_tokens=True)["input_ids"])[:max_length]
        return ids, [i > 0 for i in range(len(ids))]
    ids, weights = template.render([*example.prompt, {"role": "assistant", "content": answer}])
    prompt = template.prompt_ids(example.prompt)
    # Earlier assistant turns of a conversation are context here, not the reference being scored.
    start = len(prompt) if list(ids[: len(prompt)]) == list(prompt) else 0
    mask = [i >= start and w > 0 for i, w in enumerate(weights)]
    return list(ids)[:max_length], mask[:max_length]


def answer_after_prompt(prompt: list[int], reference: tuple[list[int], list[bool]]) -> tuple[list[int], list[bool]] | None:
    """The reference's tokens after the prompt and their target flags, or None when the reference is not the
    prompt followed by its answer (a different rendering of the prompt, targets inside it, or cut short)."""
    ids, targets = reference
    if len(ids) <= len(prompt) or list(ids[: len(prompt)]) != list(prompt) or any(targets[: len(prompt)]):
        return None
    return list(ids[len(prompt):]), list(targets[len(prompt):])


def stop_ids(model, tokenizer, template) -> set[int]:
    """End-of-turn ids of the template plus the model's own eos ids: generation stops on any of them."""
    from gemcut.generation import default_eos_ids

    return set(getattr(template, "stop_token_ids", []) or []) | default_eos_ids(model, tokenizer)


# ---------------------------------------------------------------- scoring one model


def choose_task(examples: list[Example], model) -> str:
    kinds = sorted({e.kind for e in examples})
    if len(kinds) != 1:
        raise GemcutError(f"the split mixes record kinds {kinds}; evaluation needs one kind per run")
    kind = kinds[0]
    if kind == "label":
        return "classification" if is_sequence_classifier(model) else "generative_classification"
    if kind == "preference":
        return "preference"
    if kind == "text":
        return "language_modeling"
    return "generation"


Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(stage: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def label_budget(tokenizer, labels: list[str], max_new_tokens: int) -> int:
    """Generation budget of a generative classifier: the longest label's tokens plus a margin of 8, at most
    `eval.max_new_tokens`. The instruction asks for the label only; the margin leaves room for "Positive."
    or a short preamble, and not spending 32 tokens per answer makes a large test split affordable."""
    longest = max((len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels), default=1)
    return max(1, min(max_new_tokens, longest + 8))


def score_model(task: str, model, tokenizer, template, examples: list[Example], labels: list[str], cfg: RunConfig,
                log: Callable[[str], None], progress: Progress = _no_progress, name: str = "model") -> ModelResults:
    """Run one model over the examples; what is computed depends on the task (module docstring).

    `progress(stage, total)` starts a progress stage and returns `advance(n)`; the CLI draws it as a bar.
    """
    t0 = time.time()
    ev, max_len = cfg.eval, cfg.data.max_length
    res = ModelResults()
    n = len(examples)

    def nll_of(targets: list[tuple[list[int], list[bool]]], stage: str) -> list[tuple[float, int]]:
        return scoring.sequence_nll(model, [t[0] for t in targets], [t[1] for t in targets], batch_size=ev.batch_size,
                                    progress=progress(f"{name}: {stage}", n))

    if task == "classification":
        # Truncated like training's `data.overlong=truncate` (special tokens such as [SEP] kept at the end).
        ids = [list(tokenizer(e.text, truncation=True, max_length=max_len)["input_ids"]) for e in examples]
        index, res.nll = scoring.predict_classes(model, tokenizer, ids, [labels.index(e.label) for e in examples],
                                                 batch_size=ev.batch_size, progress=progress(f"{name}: classify", n))
        res.predictions = [labels[i] if 0 <= i < len(labels) else None for i in index]
    elif task in ("generative_classification", "generation"):
        budget = label_budget(tokenizer, labels, ev.max_new_tokens) if task == "generative_classification" else ev.max_new_tokens
        prompts = [list(template.prompt_ids(e.prompt)) for e in examples]
        references = [reference_targets(e, tokenizer, template, max_len) for e in examples]
        answers = [answer_after_prompt(p, r) for p, r in zip(prompts, references)]
        gens = scoring.generate_texts(model, tokenizer, prompts, max_new_tokens=budget, temperature=ev.temperature,
                                      top_p=ev.top_p, seed=cfg.train.seed, batch_size=ev.batch_size,
                                      eos_ids=stop_ids(model, tokenizer, template),
                                      answers=answers if all(answers) else None, progress=progress(f"{name}: generate", n))
        res.texts = [g.text for g in gens]
        res.extra["max_new_tokens"] = budget
        res.extra["finish_reasons"] = {r: sum(g.finish_reason == r for g in gens) for r in ("stop", "length")}
        if task == "generative_classification":
            res.predictions, res.rules = map_many(res.texts, labels)
        # The reference's loss: for a generative classifier, the validation loss of training on this split. It
        # comes from the generation's prompt pass when every reference is a plain answer after its prompt.
        res.nll = [g.answer_nll for g in gens] if all(answers) else nll_of(references, "reference loss")
    elif task == "language_modeling":
        res.nll = nll_of([reference_targets(e, tokenizer, template, max_len) for e in examples], "perplexity")
    elif task == "preference":
        if is_sequence_classifier(model):
            def text_ids(e: Example, answer: str) -> list[int]:
                return template.render([*e.prompt, {"role": "assistant", "content": answer}])[0][:max_len]

            for side in ("chosen", "rejected"):
                answers = [text_ids(e, e.reference if side == "chosen" else e.rejected) for e in examples]
                setattr(res, side, scoring.reward_scores(model, tokenizer, answers, batch_size=ev.batch_size,
                                                         progress=progress(f"{name}: reward of {side}", n)))
        else:
            # Summed log-likelihood of each answer given the prompt: the quantity DPO's implicit reward is built on.
            for side in ("chosen", "rejected"):
                targets = [reference_targets(e, tokenizer, template, max_len, e.reference if side == "chosen" else e.rejected)
                           for e in examples]
                setattr(res, side, [-x[0] for x in nll_of(targets, f"log-likelihood of {side}")])
    else:
        raise ValueError(f"unknown evaluation task {task!r}")
    res.seconds = time.time() - t0
    log(f"  {name}: scored {n} examples in {res.seconds:.1f}s")
    return res


# ---------------------------------------------------------------- forgetting check


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
                     progress: Progress = _no_progress) -> dict | None:
    """Perplexity on general held-out examples, tuned vs base, and whether it rose by more than the margin;
    where the examples carry answers (FORGETTING_TASKS), task accuracy too, and whether it fell by more."""
    spec = cfg.eval.forgetting_data
    if spec is None:
        return {"skipped": "eval.forgetting_data is None"}
    if in_training_data(spec, cfg.data.train):
        # Perplexity on what the run trained on can only fall: it would hide forgetting, and costs half of eval.
        why = (f"eval.forgetting_data={spec} is part of this run's training data (data.train), so it measures fit, not "
               "forgetting; pass eval.forgetting_data=chitchat (or another set the run did not train on) or eval.forgetting_data=none")
        return {"skipped": why, "warning": why, "in_training_data": True}
    if is_sequence_classifier(loaded.model):
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


# ---------------------------------------------------------------- the whole evaluation


def compute_precision(model, cfg: RunConfig):
    """(name, context factory): evaluation computes in the precision the run trained in (train.precision),
    so bf16 autocast where the hardware has it, for both the tuned and the base model."""
    from gemcut.train.loop import resolve_precision

    device = next(model.parameters()).device
    precision = resolve_precision(cfg.train.precision, device)
    return precision, lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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


def samples(examples: list[Example], tuned: ModelResults, base: ModelResults | None, n: int) -> list[dict]:
    """The first n examples side by side: prompt, reference, base and tuned answers."""
    def answer(r: ModelResults | None, i: int):
        if r is None:
            return None
        if r.texts is not None:
            return r.texts[i]
        if r.predictions is not None:
            return r.predictions[i] if r.predictions[i] is not None else "(unparseable)"
        if r.nll is not None and r.nll[i][1]:
            return f"perplexity {math.exp(r.nll[i][0] / r.nll[i][1]):.2f}"
        if r.chosen is not None:
            return f"chosen {r.chosen[i]:.3f} vs rejected {r.rejected[i]:.3f}"
        return None

    out = []
    for i, e in enumerate(examples[:n]):
        prompt = e.prompt[-1]["content"] if e.prompt else (e.text or "")
        row = {"source": e.source, "prompt": prompt, "reference": e.reference, "base": answer(base, i), "tuned": answer(tuned, i)}
        if tuned.predictions is not None and tuned.texts is not None:
            row["tuned_label"] = tuned.predictions[i]
            row["base_label"] = base.predictions[i] if base is not None else None
        out.append(row)
    return out


def _predictions_lines(examples: list[Example], tuned: ModelResults, base: ModelResults | None) -> list[dict]:
    lines = []
    for i, e in enumerate(examples):
        row: dict = {"source": e.source, "reference": e.reference}
        for name, r in (("tuned", tuned), ("base", base)):
            if r is None:
                continue
            if r.texts is not None:
                row[f"{name}_text"] = r.texts[i]
            if r.predictions is not None:
                row[f"{name}_label"] = r.predictions[i]
            if r.nll is not None:
                row[f"{name}_nll"], row[f"{name}_tokens"] = r.nll[i]
            if r.chosen is not None:
                row[f"{name}_chosen"], row[f"{name}_rejected"] = r.chosen[i], r.rejected[i]
        lines.append(row)
    return lines


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _clean_floats(obj):
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean_floats(v) for v in obj]
    return obj


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
    progress = progress or _no_progress
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
    task = choose_task(examples, loaded.model)
    unknown = [e for e in examples if e.label is not None and e.label not in labels]
    if unknown:
        raise GemcutError(f"{unknown[0].source}: label {unknown[0].label!r} is not one the model was trained on ({', '.join(labels)}); "
                          f"{len(unknown)} {split} records have such labels; re-prepare the data with data.labels covering them")
    references = [e.reference for e in examples]

    precision, compute = compute_precision(loaded.model, cfg)
    log(f"task {task}: scoring the tuned model on {len(examples)} {split} examples ({precision})")
    with compute(), tuned_model(loaded) as tm:
        tuned = score_model(task, tm, loaded.tokenizer, loaded.template, examples, labels, cfg, log, progress, "tuned")
    base_res = None
    if base:
        log("scoring the base model" + (" (adapter disabled)" if is_lora(loaded.model) else ""))
        with base_model(loaded, cfg) as bm, compute():
            base_res = score_model(task, bm, loaded.tokenizer, loaded.template, examples, labels, cfg, log, progress, "base")
    summary = summarise(task, references, labels, tuned, base_res, n_resamples=cfg.eval.bootstrap, seed=cfg.train.seed)
    with compute():
        forgetting = forgetting_check(loaded, cfg, with_base=base, log=log, progress=progress)

    result = {
        "run": str(run_dir), "split": split, "checkpoint": checkpoint, "task": task, "labels": labels if summary["tuned"].get("per_class") else None,
        "n_examples": len(examples), "n_in_split": n_total, "n_left_out": n_total - len(examples), "precision": precision,
        "headline": headline_text(summary), **summary, "forgetting": forgetting,
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
    result["seconds"] = round(time.time() - t_start, 2)
    result = _clean_floats(result)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2, default=_json_default))
    with (run_dir / "eval_predictions.jsonl").open("w", encoding="utf-8") as f:
        for row in _predictions_lines(examples, tuned, base_res):
            f.write(json.dumps(_clean_floats(row), default=_json_default) + "\n")
    if report:
        from gemcut.eval.report import write_report

        write_report(run_dir, result)
    log(f"wrote {run_dir / 'eval.json'}" + (f" and {run_dir / 'report.html'}" if report else ""))
    return result


# ---------------------------------------------------------------- checkpoint choice


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


def _metric_name(metric: str | None, cfg: RunConfig, task: str) -> str:
    """A metric of this evaluation: given, or the early-stopping metric without its `val_` prefix.

    `loss` is the mean loss of the references, the quantity the training loop logs as `val_loss` (for
    preference data, which has no single reference, the headline metric is used instead).
    """
    from gemcut.eval.summary import HEADLINE

    name = (metric or cfg.train.early_stopping.metric).removeprefix("val_")
    if name == "loss" and task == "preference":
        return HEADLINE[task]
    return name


def select_checkpoint(run_dir, metric: str | None = None, *, split: str = "validation", max_examples: int | None = None,
                      log: Callable[[str], None] | None = None, progress: Progress | None = None,
                      trust_remote_code: bool = False, overrides: list[str] | None = None) -> dict:
    """Evaluate every kept checkpoint on `split`, mark the best by `metric`, and say which one final/ holds.

    `metric` is a metric name of the task (macro_f1, accuracy, rougeL, perplexity, ...); default: the run's
    `train.early_stopping.metric`. Lower is better for perplexity, higher for the rest. Writes
    `checkpoints.json` into the run folder and returns it: {split, metric, higher_is_better, checkpoints:
    [{name, step, value, best}], best, loop_best (the loop's `checkpoints/best`), final_step, final_is_best}.
    """
    from gemcut.eval.summary import LOWER_IS_BETTER
    from gemcut.models.load import load_run
    from gemcut.train.checkpoint import best_checkpoint, complete_checkpoints

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
        task = choose_task(examples, loaded.model)
        name = _metric_name(metric, cfg, task)
        with tuned_model(loaded) as tm:
            res = score_model(task, tm, loaded.tokenizer, loaded.template, examples, labels, cfg, log,
                              progress or _no_progress, path.name)
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
    (run_dir / "checkpoints.json").write_text(json.dumps(_clean_floats(out), indent=2))
    return out
