"""The task table: what each kind of run is, decided once and read everywhere else.

    python -m pytest -q tests/test_tasks.py

A run's task is resolved once, from `objective.kind` (or, with `auto`, from the record kind), by
`resolve_task`; the run writes its name to `gemcut_run.json`, and everything after (the loader, the
tokenizer, the loop, evaluation, export, serving) looks the name up here with `task_named` instead of
testing names. The table is declarative: it names the model head, the example shape, the collator and the
evaluation by words that the layer which owns each thing maps to code (`gemcut.data.collate.collator_for`,
`gemcut.objectives.build_objective`, `gemcut.models.load.model_class`), so it sits below all of them.

| task        | model head   | records (-> example shape)                              | batches     | reference  | served as |
|-------------|--------------|---------------------------------------------------------|-------------|------------|-----------|
| causal_lm   | causal_lm    | text (text); prompt_completion, messages, label (chat)  | causal      | -          | chat      |
| classify    | classifier   | label (classify)                                        | classify    | -          | classify  |
| reward      | scorer       | preference (preference)                                 | preference  | -          | score     |
| dpo         | causal_lm    | preference (preference)                                 | preference  | adapter off| chat      |
| grpo, ppo   | causal_lm    | text, label, prompt_completion, messages (prompts)      | rollouts    | adapter off| chat      |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gemcut.errors import ConfigError

Head = Literal["causal_lm", "classifier", "scorer"]
Shape = Literal["text", "chat", "classify", "preference", "prompts"]
Batches = Literal["causal", "classify", "preference", "rollouts"]
CHAT_KINDS = ("prompt_completion", "messages", "label")


@dataclass(frozen=True)
class Task:
    """One row of the table.

    `head`: the model class (causal_lm: AutoModelForCausalLM; classifier: AutoModelForSequenceClassification
    with one output per label; scorer: the same with one output, a reward model).
    `shapes`: the record kinds the task trains on, each with the example shape the tokenizer makes of it.
    `batches`: how examples become batches (the collator; `rollouts`: the policy samples its own, see
    gemcut/train/rollouts.py). `reference`: the frozen model the loss compares with is the same weights with
    the adapter switched off, so the task needs a LoRA adapter. `metric`/`mode`: what "best" means when
    `train.early_stopping.metric` is auto. `eval`: how `gemcut eval` scores it. `served_as`: the API it gets.
    `uniform_choices`: what the loss is a cross-entropy over (the collapse guard's ln K): the vocabulary,
    the labels, a pair's two sides, or nothing (RL losses are not). `value_head`: the task trains one beside the
    policy. `samples`: validation during training writes a few generated answers to samples.jsonl.
    """

    name: str
    head: Head
    shapes: dict[str, Shape]
    batches: Batches
    reference: bool
    metric: str
    mode: Literal["min", "max"]
    eval: Literal["language_model", "classification", "preference", "reward"]
    served_as: Literal["chat", "classify", "score"]
    uniform_choices: Literal["vocabulary", "labels", "pair", "none"]
    describe: str
    value_head: bool = False  # trains a value head beside the policy (PPO; gemcut/models/value_head.py)
    samples: bool = False  # generates a few validation answers at each evaluation (SFT; gemcut/train/samples.py)

    @property
    def classifier(self) -> bool:
        """Whether the model ends in a sequence-classification head (classifier or scorer)."""
        return self.head != "causal_lm"

    @property
    def rollouts(self) -> bool:
        return self.batches == "rollouts"

    def shape(self, kind: str) -> Shape:
        """The example shape of `kind` records, or a ConfigError naming the kinds this task takes."""
        if kind not in self.shapes:
            takes = ", ".join(self.shapes)
            fits = [t.name for t in TASKS.values() if kind in t.shapes]
            raise ConfigError(f"objective.kind={self.name} trains on {takes} records, not {kind}; "
                              f"{kind} records train {' or '.join(fits)} (set objective.kind, or data.kind)")
        return self.shapes[kind]

    def chat_template(self, kind: str, explicit: bool) -> Literal["required", "if_any", "none"]:
        """Whether `kind` records need the chat template: `required` when conversations are rendered through
        it; `if_any` when the model keeps the tokenizer's own for chatting later (raw text, or a template
        named in data.template); `none` for classifiers of raw text."""
        shape = self.shape(kind)
        if shape in ("chat", "preference") or (shape == "prompts" and kind != "text"):
            return "required"
        if self.head == "classifier":
            return "none"
        return "required" if explicit else "if_any"


_CHAT = {"prompt_completion": "chat", "messages": "chat", "label": "chat"}
_PROMPTS = {"text": "prompts", "label": "prompts", "prompt_completion": "prompts", "messages": "prompts"}

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("causal_lm", "causal_lm", {"text": "text", **_CHAT}, "causal", False, "val_loss", "min", "language_model",
         "chat", "vocabulary", "continued pretraining (text) or supervised fine-tuning (chats, pairs)", samples=True),
    Task("classify", "classifier", {"label": "classify"}, "classify", False, "val_loss", "min", "classification",
         "classify", "labels", "a new classification head over labelled texts"),
    Task("reward", "scorer", {"preference": "preference"}, "preference", False, "val_loss", "min", "reward",
         "score", "pair", "a reward model: one score per text, trained on ranked pairs"),
    Task("dpo", "causal_lm", {"preference": "preference"}, "preference", True, "val_loss", "min", "preference",
         "chat", "pair", "direct preference optimisation against the adapter-off model"),
    Task("grpo", "causal_lm", _PROMPTS, "rollouts", True, "val_reward_mean", "max", "language_model",
         "chat", "none", "group-relative policy optimisation against a reward"),
    Task("ppo", "causal_lm", _PROMPTS, "rollouts", True, "val_reward_mean", "max", "language_model",
         "chat", "none", "PPO with a value head against a reward", value_head=True),
)}

# What `objective.kind: auto` trains on each record kind.
AUTO = {"text": "causal_lm", "prompt_completion": "causal_lm", "messages": "causal_lm", "label": "classify",
        "preference": "dpo"}


def task_named(name: str) -> Task:
    """The task called `name` (as written in gemcut_run.json), or a ConfigError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def resolve_task(objective_kind: str, record_kind: str | None) -> Task:
    """`objective.kind`, or with `auto` what the records imply (AUTO). With the record kind known, the task
    must train on it (a ConfigError says which tasks do)."""
    if objective_kind == "auto":
        if record_kind in (None, "auto"):
            return TASKS["causal_lm"]
        if record_kind not in AUTO:
            raise ConfigError(f"unknown record kind {record_kind!r}; expected one of {', '.join(AUTO)}")
        return TASKS[AUTO[record_kind]]
    task = task_named(objective_kind)
    if record_kind not in (None, "auto"):
        task.shape(record_kind)
    return task
