"""Sequence classification: cross-entropy over class logits, with optional class weights.

    python -m pytest -q tests/test_objectives.py

The fine-tuning objective of Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding" (2019), sec. 4.1: a new linear head on the pooled representation, trained with
cross-entropy on the labels. Class weights follow the usual cost-sensitive form: example i contributes
w[y_i] * CE_i; "balanced" weights are n / (k * n_c) (King & Zeng, "Logistic Regression in Rare Events
Data", 2001; scikit-learn's `class_weight="balanced"`).

Batch: `input_ids` [B,T], `attention_mask` [B,T], `labels` [B] int. The loss is summed over examples and the
loop normalises by the number of examples in the whole accumulated step; with balanced weights the mean
weight over the training set is 1, so the scale matches the unweighted loss.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gemcut.objectives.base import ObjectiveOutput


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """n / (k * n_c) per class; a class absent from `labels` gets 1.0 (it never weighs a training example)."""
    counts = Counter(int(y) for y in labels)
    n = len(labels)
    return [n / (num_classes * counts[c]) if counts[c] else 1.0 for c in range(num_classes)]


class Classify:
    """Cross-entropy on `model(...).logits` [B, C], summed over examples.

    Metrics: `correct` (argmax hits) and `confusion`, the flattened [C*C] counts of (true, predicted) pairs,
    from which validation derives macro-F1: on imbalanced labels accuracy hides a neglected minority class."""

    task = "classify"

    def __init__(self, class_weights: Sequence[float] | torch.Tensor | None = None):
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        weight = self.class_weights
        if weight is not None and weight.device != logits.device:
            weight = self.class_weights = weight.to(logits.device)
        loss_sum = F.cross_entropy(logits, labels, weight=weight, reduction="sum")
        predicted = logits.argmax(dim=-1)
        n_classes = logits.shape[-1]
        confusion = torch.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes)
        return ObjectiveOutput(loss_sum, int(labels.shape[0]), {"correct": (predicted == labels).sum(), "confusion": confusion})
