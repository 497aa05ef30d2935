"""Objectives: each turns a batch into a summed loss, a target count and summed metrics.

    python -m pytest -q tests/test_objectives.py

`build_objective` is where a run's task becomes an objective object, once, outside the loop; the loop
knows only the `Objective` interface (gemcut/objectives/base.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from gemcut.config import RunConfig
from gemcut.errors import TrainingError
from gemcut.objectives.base import Objective, ObjectiveOutput
from gemcut.objectives.causal_lm import CausalLM
from gemcut.objectives.classify import Classify, balanced_class_weights
from gemcut.tasks import Task

__all__ = ["Objective", "ObjectiveOutput", "CausalLM", "Classify", "balanced_class_weights", "build_objective"]


def class_weights_for(config: RunConfig, labels: Sequence[str], train_labels: Sequence[int]) -> list[float] | None:
    """objective.class_weights resolved: none, balanced over the training labels, or the listed weights."""
    weights = config.objective.class_weights
    if weights == "balanced":
        return balanced_class_weights(list(train_labels), len(labels))
    if weights == "none":
        return None
    if len(weights) != len(labels):
        raise TrainingError(f"objective.class_weights has {len(weights)} values for {len(labels)} labels ({', '.join(labels)})")
    return list(weights)


def _classify(config: RunConfig, labels: Sequence[str], train_examples: Sequence[dict]) -> Objective:
    return Classify(class_weights_for(config, labels, [ex["label"] for ex in train_examples]))


def _reward(config, labels, train_examples) -> Objective:
    from gemcut.objectives.reward import PairwiseReward

    return PairwiseReward()


def _dpo(config, labels, train_examples) -> Objective:
    from gemcut.objectives.dpo import DPO

    return DPO(config.objective.dpo.beta)


def _grpo(config, labels, train_examples) -> Objective:
    from gemcut.objectives.grpo import GRPO

    return GRPO(clip_range=config.objective.rl.clip_range, kl_coef=config.objective.rl.kl_coef)


def _ppo(config, labels, train_examples) -> Objective:
    from gemcut.objectives.ppo import PPO

    return PPO(clip_range=config.objective.rl.clip_range, value_clip=config.objective.rl.value_clip)


# The objective of each task of gemcut/tasks.py: (config, labels, training examples) -> Objective.
FACTORIES = {"causal_lm": lambda config, labels, train_examples: CausalLM(), "classify": _classify, "reward": _reward,
             "dpo": _dpo, "grpo": _grpo, "ppo": _ppo}


def build_objective(task: Task, config: RunConfig, *, labels: Sequence[str] | None = None,
                    train_examples: Sequence[dict] = ()) -> Objective:
    """The objective of `task` with its settings from `config` (classify's class weights need the labels and
    the training examples; the others only the config)."""
    if task.name not in FACTORIES:  # a row added to gemcut/tasks.py without its objective
        raise TrainingError(f"no objective for task {task.name!r}; add it to gemcut.objectives.FACTORIES")
    return FACTORIES[task.name](config, labels or [], train_examples)
