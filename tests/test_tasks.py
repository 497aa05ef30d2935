"""The task table (gemcut/tasks.py): resolved once, and the only place task names are tested."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gemcut.errors import ConfigError
from gemcut.tasks import AUTO, TASKS, resolve_task, task_named

GEMCUT = Path(__file__).resolve().parents[1] / "gemcut"


def test_auto_follows_the_record_kind():
    assert {kind: resolve_task("auto", kind).name for kind in AUTO} == {
        "text": "causal_lm", "prompt_completion": "causal_lm", "messages": "causal_lm", "label": "classify",
        "preference": "dpo"}
    assert resolve_task("auto", None).name == "causal_lm"  # before the data is read


def test_a_task_refuses_records_it_cannot_train_on_and_names_the_ones_that_can():
    with pytest.raises(ConfigError, match=r"objective.kind=dpo trains on preference records, not text; "
                                          r"text records train causal_lm or grpo or ppo"):
        resolve_task("dpo", "text")
    with pytest.raises(ConfigError, match="known tasks: causal_lm, classify, reward, dpo, grpo, ppo"):
        task_named("sft")


def test_chat_template_need():
    assert TASKS["causal_lm"].chat_template("messages", False) == "required"
    assert TASKS["causal_lm"].chat_template("text", False) == "if_any"
    assert TASKS["causal_lm"].chat_template("text", True) == "required"
    assert TASKS["classify"].chat_template("label", False) == "none"
    assert TASKS["reward"].chat_template("preference", False) == "required"
    assert TASKS["grpo"].chat_template("prompt_completion", False) == "required"
    assert TASKS["grpo"].chat_template("text", False) == "if_any"


def test_every_task_has_its_collator_objective_and_model_class():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from gemcut.config import RunConfig
    from gemcut.models.load import model_class
    from gemcut.objectives import build_objective
    from gemcut.train.batches import collator_for

    for task in TASKS.values():
        build_objective(task, RunConfig(), labels=["a", "b"], train_examples=[{"label": 0}])
        if not task.rollouts:
            assert callable(collator_for(task, pad_id=0))
        assert model_class(task) is (AutoModelForSequenceClassification if task.classifier else AutoModelForCausalLM)


def _holds_a_task_name(node: ast.AST) -> bool:
    """`task`, `loaded.task`, `task.name`, `objective.kind`: an expression whose value is a task's name."""
    text = ast.unparse(node)
    return text == "task" or text.endswith((".task", "task.name", "objective.kind", "task_name"))


def _task_name_tests(path: Path) -> list[str]:
    """`task == "classify"`, `loaded.task in ("dpo", "ppo")` and the like: a task's name compared with a string."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        strings = {c.value for side in sides
                   for c in (side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side])
                   if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        if strings & set(TASKS) and any(_holds_a_task_name(side) for side in sides):
            found.append(f"{path.relative_to(GEMCUT.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_task_name_is_tested_outside_the_table():
    """What a task is and does is read from gemcut/tasks.py; a new task is one new row, not a hunt through
    string tests (the issue this table resolved found 34 of them in ten files)."""
    found = [hit for path in sorted(GEMCUT.rglob("*.py")) if path.name != "tasks.py" for hit in _task_name_tests(path)]
    assert not found, "task names tested outside gemcut/tasks.py:\n" + "\n".join(found)
