"""Objectives against reference values: HF's own causal-LM loss, hand-computed weighted cross-entropy.

    python -m pytest -q tests/test_objectives.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import bert, causal_examples, class_examples, collate_causal, collate_classify, llama

from gemcut.errors import TrainingError
from gemcut.objectives import CausalLM, Classify, balanced_class_weights, build_objective
from gemcut.objectives import causal_lm as causal_module


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return llama()


def test_causal_loss_matches_transformers_own_loss(model):
    batch = collate_causal(causal_examples(6))
    out = CausalLM()(model, batch)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert out.n_targets == int((batch["labels"][:, 1:] != -100).sum())
    assert out.n_targets == CausalLM().count(batch)
    torch.testing.assert_close(out.loss_sum / out.n_targets, reference, rtol=1e-5, atol=1e-6)


def test_head_on_targets_only_equals_full_logits_path(model, monkeypatch):
    batch = collate_causal(causal_examples(5, seed=3))
    fast = CausalLM()(model, batch)
    assert causal_module._decoder_and_head(model) is not None  # the tiny Llama takes the fast path
    monkeypatch.setattr(causal_module, "_PLAIN_HEAD_TYPES", frozenset())
    assert causal_module._decoder_and_head(model) is None
    slow = CausalLM()(model, batch)
    torch.testing.assert_close(fast.loss_sum, slow.loss_sum, rtol=1e-5, atol=1e-5)
    assert fast.n_targets == slow.n_targets


def test_only_labelled_positions_carry_loss(model):
    """With one labelled token per row the loss is exactly -log p(that token | its prefix), by hand."""
    examples = causal_examples(2, seed=5)
    single = []
    for e in examples:
        labels = [-100] * len(e["labels"])
        labels[-1] = e["input_ids"][-1]
        single.append({**e, "labels": labels})
    batch = collate_causal(single)
    out = CausalLM()(model, batch)
    assert out.n_targets == 2
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = 0.0
    for row, e in enumerate(examples):
        t = len(e["input_ids"]) - 1
        expected -= float(torch.log_softmax(logits[row, t - 1], -1)[e["input_ids"][t]])
    assert math.isclose(float(out.loss_sum.detach()), expected, rel_tol=1e-5)


def test_loss_weight_scales_tokens_and_zero_weight_removes_them(model):
    examples = causal_examples(3, seed=7)
    plain = CausalLM()(model, collate_causal(examples))
    doubled = CausalLM()(model, collate_causal([{**e, "loss_weight": [2.0] * len(e["input_ids"])} for e in examples]))
    torch.testing.assert_close(doubled.loss_sum, 2 * plain.loss_sum, rtol=1e-5, atol=1e-5)
    assert doubled.n_targets == plain.n_targets
    zeroed = [{**e, "loss_weight": [1.0] * (len(e["input_ids"]) - 1) + [0.0]} for e in examples]
    out = CausalLM()(model, collate_causal(zeroed))
    assert out.n_targets == plain.n_targets - 3 == CausalLM().count(collate_causal(zeroed))


def test_classify_class_weights_and_accuracy():
    model = bert()
    batch = collate_classify(class_examples(9))
    weights = [0.5, 2.0, 1.0]
    out = Classify(weights)(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
    expected = sum(weights[int(y)] * float(ce) for y, ce in zip(batch["labels"], per_example))
    assert math.isclose(float(out.loss_sum.detach()), expected, rel_tol=1e-5)
    assert out.n_targets == 9 == Classify().count(batch)
    assert int(out.metrics["correct"]) == int((logits.argmax(-1) == batch["labels"]).sum())
    unweighted = Classify()(model, batch)
    assert math.isclose(float(unweighted.loss_sum.detach()), float(per_example.sum()), rel_tol=1e-5)


def test_balanced_class_weights():
    weights = balanced_class_weights([0, 0, 0, 1], num_classes=3)
    assert weights == [4 / (3 * 3), 4 / (3 * 1), 1.0]


def test_build_objective_builds_every_task_of_the_table():
    from gemcut.config import RunConfig
    from gemcut.objectives.dpo import DPO
    from gemcut.objectives.grpo import GRPO
    from gemcut.objectives.ppo import PPO
    from gemcut.objectives.reward import PairwiseReward
    from gemcut.tasks import TASKS

    cfg = RunConfig.model_validate({"objective": {"class_weights": "balanced"}})
    built = {name: build_objective(task, cfg, labels=["a", "b"], train_examples=[{"label": 0}, {"label": 0}, {"label": 1}])
             for name, task in TASKS.items()}
    assert {name: type(o) for name, o in built.items()} == {
        "causal_lm": CausalLM, "classify": Classify, "reward": PairwiseReward, "dpo": DPO, "grpo": GRPO, "ppo": PPO}
    with pytest.raises(TrainingError, match="3 values for 2 labels"):
        build_objective(TASKS["classify"], RunConfig.model_validate({"objective": {"class_weights": [1, 2, 3]}}), labels=["a", "b"])
