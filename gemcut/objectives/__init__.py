"""Objectives: each turns a batch into a summed loss, a target count and summed metrics.

    python -m pytest -q tests/test_objectives.py

`build_objective` is where a run's task name becomes an objective object, once, outside the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from gemcut.errors import TrainingError
from gemcut.objectives.base import Objective, ObjectiveOutput
from gemcut.objectives.causal_lm import CausalLM
from gemcut.objectives.classify import Classify, balanced_class_weights

__all__ = ["Objective", "ObjectiveOutput", "CausalLM", "Classify", "balanced_class_weights", "build_objective"]


def build_objective(task: str, class_weights: Sequence[float] | None = None) -> Objective:
    """`task` is "causal_lm" or "classify" (what `gemcut.train.run` resolves from objective.kind)."""
    if task == "causal_lm":
        return CausalLM()
    if task == "classify":
        return Classify(class_weights)
    raise TrainingError(f"objective.kind={task!r} is not trained by `gemcut train` yet; use causal_lm or classify")
