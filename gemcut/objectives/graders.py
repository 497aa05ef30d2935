"""OpenAI's simple graders as RL rewards: string_check and text_similarity over a completion and its row's item.

    objective: {kind: grpo, rl: {grader: {type: string_check, name: exact, input: "{{sample.output_text}}",
                                          reference: "{{item.answer}}", operation: eq}}}
    data: {extra_fields: keep}      # the row's other fields ({"messages": [...], "answer": "4"}) become its item
    python -m pytest -q tests/test_graders.py

The grader objects are those of OpenAI's reinforcement fine-tuning (openai.types.graders; validated as
`gemcut.config.GraderConfig`). Templates: `{{sample.output_text}}` is the sampled completion, `{{item.x}}` the
field x of the prompt's data row (`{{item.a.b}}` nested, `{{item.xs.0}}` a list element); a string is put in
as it is, any other value as JSON. A row without the field is a DataError naming the row, the template and
the field, raised before training starts (`GraderReward.check_items`).

Scores, each in [0, 1]:
- string_check: 1.0 when `operation` holds, else 0.0. eq: input == reference; ne: input != reference;
  like: reference is a substring of input; ilike: the same, ignoring case (str.casefold).
- text_similarity, by `evaluation_metric`:
  - fuzzy_match: difflib.SequenceMatcher(None, input, reference, autojunk=False).ratio() = 2M / (len(input)
    + len(reference)), M the characters of the matching blocks (Ratcliff/Obershelp: the longest common block,
    then the same on each side of it). The standard library's stand-in for rapidfuzz's fuzz.ratio / 100
    (rapidfuzz is not a dependency), whose M is the longest common subsequence: the same on most strings,
    lower here when taking the longest block first leaves fewer characters to match on its sides.
  - bleu: sacrebleu's sentence BLEU (13a tokenizer, exponential smoothing) / 100.
  - rouge_1 ... rouge_5, rouge_l: the F-measure of rouge-score's rougeN / rougeL (Porter stemming, as
    `gemcut eval` scores ROUGE).
  cosine (an embedding model), gleu and meteor are refused by the config with the metrics that run here.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from typing import Any

import torch

from gemcut.config import TEMPLATE, GraderConfig
from gemcut.errors import ConfigError, DataError

TEMPLATE_FIELDS = ("input", "reference")


def fill_template(template: str, output_text: str, item: dict | None, *, where: str = "the grader template",
                  source: str | None = None) -> str:
    """`template` with each {{sample.output_text}} and {{item.a.b}} (inner spaces allowed) replaced; a DataError
    names a missing field."""
    def fill(match) -> str:
        name = match.group(1)
        value = output_text if name == "sample.output_text" else _item_value(name, item, where, source)
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return TEMPLATE.sub(fill, template)


def _item_value(name: str, item: dict | None, where: str, source: str | None) -> Any:
    at = f"{source}: " if source else ""
    path = name.split(".")[1:]
    if item is None:
        raise DataError(f"{at}{where} reads {{{{{name}}}}}, but the record has no item: set data.extra_fields=keep so "
                        f"that each row's fields besides its prompt ({path[0]}, ...) reach the grader", field=name,
                        reason="missing_field")
    value: Any = item
    for depth, key in enumerate(path):
        here = ".".join(["item", *path[:depth]])
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            has = (f"its fields: {', '.join(map(str, value)) or 'none'}" if isinstance(value, dict)
                   else f"it is a {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, list) else ""))
            raise DataError(f"{at}{where} reads {{{{{name}}}}}, but {here} has no {key!r} ({has}); add the field to "
                            "every row, or change the template", field=name, reason="missing_field")
    return value


def string_check(text: str, reference: str, operation: str) -> float:
    """1.0 when `operation` (eq, ne, like, ilike) holds between the input `text` and `reference`, else 0.0."""
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    if operation == "ilike":
        return float(reference.casefold() in text.casefold())
    raise ConfigError(f"objective.rl.grader.operation {operation!r} is not one of eq, ne, like, ilike")


class Similarity:
    """text_similarity's metrics (the module docstring); a ROUGE scorer is built once per metric."""

    def __init__(self, metric: str):
        self.metric = metric
        self.rouge = None
        if metric.startswith("rouge_"):
            from rouge_score import rouge_scorer

            self.key = "rougeL" if metric == "rouge_l" else f"rouge{metric[len('rouge_'):]}"
            self.rouge = rouge_scorer.RougeScorer([self.key], use_stemmer=True)

    def __call__(self, text: str, reference: str) -> float:
        if self.metric == "fuzzy_match":
            return difflib.SequenceMatcher(None, text, reference, autojunk=False).ratio()
        if self.metric == "bleu":
            import sacrebleu

            return sacrebleu.sentence_bleu(text, [reference]).score / 100.0
        if self.rouge is not None:
            return float(self.rouge.score(reference, text)[self.key].fmeasure)
        raise ConfigError(f"objective.rl.grader.evaluation_metric {self.metric!r} is not supported here")


class GraderReward:
    """A reward function (gemcut/objectives/reward_functions.py) that grades each completion against its prompt's
    item. `needs_items`: the rollout code passes `items`, one dict per completion (its prompt's row fields)."""

    needs_items = True

    def __init__(self, grader: GraderConfig):
        self.grader = grader
        self.similarity = Similarity(grader.evaluation_metric) if grader.type == "text_similarity" else None

    def grade(self, output_text: str, item: dict | None, source: str | None = None) -> float:
        """The score of one completion, in [0, 1]."""
        g = self.grader
        text, reference = (fill_template(getattr(g, f), output_text, item, where=f"objective.rl.grader.{f}", source=source)
                           for f in TEMPLATE_FIELDS)
        if self.similarity is not None:
            return self.similarity(text, reference)
        return string_check(text, reference, g.operation)

    def check_items(self, prompts: Sequence[dict]) -> None:
        """Fill both templates for every prompt (`gemcut.train.rollouts.prompt_inputs`' dicts) before any sampling,
        so a row without a field the grader reads stops the run at once, naming the row."""
        for p in prompts:
            for f in TEMPLATE_FIELDS:
                fill_template(getattr(self.grader, f), "", p.get("item"), where=f"objective.rl.grader.{f}", source=p.get("source"))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], completion_ids=None,
                 items: Sequence[dict | None] | None = None) -> torch.Tensor:
        if items is None:
            items = [None] * len(completions)
        return torch.tensor([self.grade(c, item) for c, item in zip(completions, items)], dtype=torch.float32)


def grader_reward(grader: GraderConfig | dict) -> GraderReward:
    """The reward of an OpenAI grader object (a dict as OpenAI's API takes it, validated here with the config's
    errors, or `objective.rl.grader`)."""
    if isinstance(grader, dict):
        from gemcut.config import validate

        grader = validate({"objective": {"rl": {"grader": grader}}}).objective.rl.grader
    return GraderReward(grader)
