"""The evaluation task follows from the run's task table row and the record kind, never from the model's class."""

import pytest

from gemcut.errors import GemcutError
from gemcut.eval.examples import Example
from gemcut.eval.task_scoring import eval_task
from gemcut.tasks import TASKS, task_named


def _examples(kind: str, n: int = 2) -> list[Example]:
    return [Example(f"x.jsonl:{i}", kind, None, "ref") for i in range(n)]


@pytest.mark.parametrize(("task", "kind", "expected"), [
    ("classify", "label", "classification"),
    ("causal_lm", "label", "generative_classification"),
    ("causal_lm", "text", "language_modeling"),
    ("causal_lm", "prompt_completion", "generation"),
    ("causal_lm", "messages", "generation"),
    ("dpo", "preference", "preference"),
    ("reward", "preference", "preference"),
    ("grpo", "label", "generative_classification"),
    ("ppo", "prompt_completion", "generation"),
])
def test_eval_task_from_the_table_and_the_record_kind(task, kind, expected):
    assert eval_task(task_named(task), _examples(kind)) == expected


def test_every_task_and_record_kind_it_trains_on_has_an_evaluation():
    for task in TASKS.values():
        for kind in task.shapes:
            assert eval_task(task, _examples(kind))


def test_mixed_kinds_and_kinds_the_run_never_trained_on_are_errors():
    with pytest.raises(GemcutError, match="mixes record kinds"):
        eval_task(task_named("causal_lm"), _examples("text") + _examples("messages"))
    with pytest.raises(GemcutError, match="a classify run trains on label records"):
        eval_task(task_named("classify"), _examples("text"))
