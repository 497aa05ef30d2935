"""Constrained label likelihood: a causal LM's answer to a label question is the label it finds most likely.

    python -m pytest -q tests/test_eval_baselines.py

A base model asked "negative, neutral or positive?" often answers in a way no rule maps to a label ("The
tweet expresses..."), so scoring its free text says more about its format than about what it knows. Here the
model never writes: each label is appended to the prompt as the assistant's answer, rendered by the run's chat
template, and the label's score is the summed log-probability of the answer's target tokens (the label and
the template's end-of-turn token, the tokens training puts loss on), the formula of
`gemcut.models.numerics.token_nll` through `gemcut.eval.scoring.sequence_nll`. The prediction is the argmax
over labels, so every answer is a label by construction (Brown et al. 2020, "Language Models are Few-Shot
Learners", section 2.4, the multiple-choice scoring of https://arxiv.org/abs/2005.14165).

Cost: one forward pass per label per example, batched; the rows of a batch share the chat header, the
instruction and any few-shot examples, which `sequence_nll` runs once per batch (gemcut/models/shared_prefix.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from gemcut.eval import scoring
from gemcut.eval.examples import Example
from gemcut.eval.task_scoring import reference_targets

# Prompts are scored whole: a few-shot prompt is longer than data.max_length, which bounds training rows only.
NO_TRUNCATION = 1 << 30


def names_every_label(text: str, labels: list[str]) -> bool:
    """Whether each label occurs in `text` as a whole word (ignoring case)."""
    lowered = text.lower()
    return all(re.search(r"(?<![\w])" + re.escape(lab.lower()) + r"(?![\w])", lowered) for lab in labels)


def with_label_set(prompt: list[dict], labels: list[str]) -> list[dict]:
    """The prompt with the label set named in its last user turn: unchanged when that turn names every label
    already (the quickstart's instruction does), else "Answer with one of: a, b, c." appended to it."""
    last = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
    if last is None or names_every_label(prompt[last]["content"], labels):
        return prompt
    turn = {**prompt[last], "content": f"{prompt[last]['content']}\n\nAnswer with one of: {', '.join(labels)}."}
    return [*prompt[:last], turn, *prompt[last + 1:]]


def label_logprobs(model, tokenizer, template, prompts: list[list[dict]], labels: list[str], *, batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """[N, L] summed log-probability of each label's answer tokens after each prompt conversation.

    `progress(n)` advances by scored rows, N × L in all."""
    rows_ids, rows_targets = [], []
    for prompt in prompts:
        example = Example(source="", kind="label", prompt=prompt, reference="")
        for label in labels:
            ids, targets = reference_targets(example, tokenizer, template, NO_TRUNCATION, response=label)
            rows_ids.append(ids)
            rows_targets.append(targets)
    nll = scoring.sequence_nll(model, rows_ids, rows_targets, batch_size=batch_size, progress=progress)
    return -np.array([x[0] for x in nll], dtype=float).reshape(len(prompts), len(labels))


def constrained_labels(model, tokenizer, template, prompts: list[list[dict]], labels: list[str], *, batch_size: int = 16,
                       progress: Callable[[int], None] | None = None) -> tuple[list[str], np.ndarray]:
    """(the most likely label of each prompt, the [N, L] log-probabilities it was chosen from). Ties go to the
    first label in `labels`; no answer is ever unparseable."""
    scores = label_logprobs(model, tokenizer, template, prompts, labels, batch_size=batch_size, progress=progress)
    return [labels[int(i)] for i in scores.argmax(axis=1)], scores
