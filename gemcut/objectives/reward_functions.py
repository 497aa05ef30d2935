"""Reward functions for RL: a trained reward model run, a classifier run's probability of one label, or a grader.

    objective: {kind: grpo, rl: {reward_model: runs/sentiment, reward_label: positive}}
    objective: {kind: grpo, rl: {grader: {type: string_check, reference: "{{item.answer}}", operation: eq}}}
    python -m pytest -q tests/test_rl.py tests/test_graders.py

A reward function maps a batch of rollouts to one float each:

    reward_fn(prompts: list[str], completions: list[str], completion_ids: list[list[int]]) -> Tensor [N]

One whose `needs_items` is true is also given `items=`: for each completion, its prompt's data row fields
(the record's `item`, kept with `data.extra_fields: keep`; None for a record without one). A grader
(`objective.rl.grader`, gemcut/objectives/graders.py) is such a function.

`load_reward(config.objective.rl)` builds one from a run folder (through `gemcut.models.load.load_run`, the
one way runs are loaded): a run trained with `objective.kind: reward` (one output) scores prompt and
completion together, rendered as its training data was; a classifier run with `reward_label` scores the
completion text alone with the softmax probability of that label (e.g. "positive" from a sentiment
classifier), a reward in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from gemcut.errors import ConfigError
from gemcut.models.numerics import classifier_logits


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]]) -> torch.Tensor: ...


def score(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
          items: Sequence[dict | None]) -> torch.Tensor:
    """`reward_fn` on a batch, given the rows' `items` when it reads them (`needs_items`)."""
    if getattr(reward_fn, "needs_items", False):
        return reward_fn(prompts, completions, completion_ids, items=items)
    return reward_fn(prompts, completions, completion_ids)


class ClassifierReward:
    """P(label | completion) from a sequence classifier (e.g. a sentiment classifier's "positive")."""

    def __init__(self, model, tokenizer, label_index: int, *, batch_size: int = 32, max_length: int = 128):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.label_index, self.batch_size, self.max_length = label_index, batch_size, max_length

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None) -> torch.Tensor:
        enc = self.tokenizer(list(completions), truncation=True, max_length=self.max_length)["input_ids"]
        logits = classifier_logits(self.model, self.tokenizer, enc, batch_size=self.batch_size).cpu()
        return torch.softmax(logits, dim=-1)[:, self.label_index]


class RewardModelReward:
    """The scalar output of a reward model on prompt + completion, encoded by `encode(prompt, completion)`."""

    def __init__(self, model, tokenizer, encode: Callable[[str, str], list[int]], *, batch_size: int = 16):
        self.model, self.tokenizer, self.encode, self.batch_size = model.eval(), tokenizer, encode, batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None) -> torch.Tensor:
        rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
        logits = classifier_logits(self.model, self.tokenizer, rows, batch_size=self.batch_size).cpu()
        return logits[:, 0]


def pair_encoder(tokenizer, template=None, max_length: int = 512) -> Callable[[str, str], list[int]]:
    """(prompt, completion) -> ids the way a reward model saw its training pairs: with the run's chat template,
    the prompt as a user turn and the completion as the assistant's (as `gemcut.data.tokenize` renders
    `preference` records); without one, the plain concatenated text."""
    def encode(prompt: str, completion: str) -> list[int]:
        if template is not None:
            ids = template.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])[0]
        else:
            ids = tokenizer(prompt + completion)["input_ids"]
        return list(ids)[-max_length:]  # keep the end: the reward head reads the last token
    return encode


def load_reward(rl, *, max_length: int = 512) -> RewardFn:
    """A reward function from `objective.rl`: `grader` (an OpenAI grader), or `reward_model` (a run folder) and,
    for a classifier, `reward_label`."""
    if rl.grader is not None:
        from gemcut.objectives.graders import grader_reward

        return grader_reward(rl.grader)
    if not rl.reward_model:
        raise ConfigError("objective.rl has no reward: set objective.rl.grader (an OpenAI string_check or text_similarity "
                          "grader), or objective.rl.reward_model to the run folder of a reward model, or of a classifier "
                          "together with objective.rl.reward_label (e.g. positive)")
    from gemcut.models.load import load_run

    run = load_run(rl.reward_model)
    n_out = int(getattr(run.model.config, "num_labels", 0) or 0)
    labels = list(run.labels or [])
    if n_out == 1:  # a reward model (its one "label" is the score)
        return RewardModelReward(run.model, run.tokenizer, pair_encoder(run.tokenizer, run.template, max_length))
    if rl.reward_label is not None:
        if rl.reward_label not in labels:
            raise ConfigError(f"objective.rl.reward_label={rl.reward_label!r} is not a label of {rl.reward_model} "
                              f"(its labels: {', '.join(labels) or 'none: it is not a classifier'})")
        return ClassifierReward(run.model, run.tokenizer, labels.index(rl.reward_label), max_length=max_length)
    raise ConfigError(f"{rl.reward_model} is a classifier with labels {labels}; set objective.rl.reward_label to the "
                      "label whose probability is the reward")
