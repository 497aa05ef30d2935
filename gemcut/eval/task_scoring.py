"""Score one model on a split's examples, the way its evaluation task asks (no metrics, no files).

    python -m pytest -q tests/test_eval_run.py tests/test_eval_preference.py

The evaluation task follows from the run's row of the task table (gemcut/tasks.py: `eval`, `head`) and the
split's record kind, by `eval_task`:

| task                        | run (table `eval`) and records      | a model is scored by                               |
|-----------------------------|-------------------------------------|----------------------------------------------------|
| `classification`            | classification; label               | argmax of the classifier's logits                  |
| `generative_classification` | language_model; label               | greedy answer mapped to a label (eval/labels.py)   |
| `generation`                | language_model; prompt_completion, messages | EM/ROUGE/BLEU of the answer, perplexity of the reference |
| `language_modeling`         | language_model; text                | perplexity                                         |
| `preference`                | preference or reward; preference    | pairwise accuracy: log-likelihood of each answer (a causal LM), or the reward model's score (the table's `scorer` head) |

`score_model` runs one model through the passes of `gemcut.eval.scoring` and returns a `ModelResults`;
evaluate.py calls it for the tuned and the base model, forgetting.py and checkpoint_choice.py likewise.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gemcut.config import RunConfig
from gemcut.errors import GemcutError
from gemcut.eval import scoring
from gemcut.eval.examples import Example
from gemcut.eval.labels import map_many
from gemcut.eval.summary import ModelResults
from gemcut.tasks import Task

# `progress(stage, total)` starts a progress stage and returns `advance(n)`; the CLI draws it as a bar.
Progress = Callable[[str, int], Callable[[int], None]]


def no_progress(stage: str, total: int) -> Callable[[int], None]:
    """A `Progress` that shows nothing."""
    return lambda n: None


# What a causal LM's records are evaluated as; a classifier's are `classification`, pairs `preference`.
LANGUAGE_MODEL_TASKS = {"label": "generative_classification", "text": "language_modeling",
                        "prompt_completion": "generation", "messages": "generation", "preference": "preference"}


def eval_task(task: Task, examples: list[Example]) -> str:
    """The evaluation task of a `task` run (its table row) on these examples (module docstring)."""
    kinds = sorted({e.kind for e in examples})
    if len(kinds) != 1:
        raise GemcutError(f"the split mixes record kinds {kinds}; evaluation needs one kind per run")
    kind = kinds[0]
    if kind not in task.shapes:
        raise GemcutError(f"the split holds {kind} records; a {task.name} run trains on {', '.join(task.shapes)} records")
    if task.eval == "classification":
        return "classification"
    if task.eval in ("preference", "reward"):
        return "preference"
    return LANGUAGE_MODEL_TASKS[kind]


def label_budget(tokenizer, labels: list[str], max_new_tokens: int) -> int:
    """Generation budget of a generative classifier: the longest label's tokens plus a margin of 8, at most
    `eval.max_new_tokens`. The instruction asks for the label only; the margin leaves room for "Positive."
    or a short preamble, and not spending 32 tokens per answer makes a large test split affordable."""
    longest = max((len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels), default=1)
    return max(1, min(max_new_tokens, longest + 8))


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


def score_model(task: str, model, tokenizer, template, examples: list[Example], labels: list[str], cfg: RunConfig,
                log: Callable[[str], None], progress: Progress = no_progress, name: str = "model", *,
                scorer: bool = False) -> ModelResults:
    """Run one model over the examples; what is computed depends on the evaluation `task` (module docstring).

    `scorer`: the model is a reward model (the task table's `scorer` head), so preference pairs are ranked
    by its output instead of by the log-likelihood of each answer.
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
        if scorer:
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
