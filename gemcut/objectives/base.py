"""What every objective returns, and the interface the training loop relies on.

    python -m pytest -q tests/test_objectives.py

An objective is a small callable `objective(model, batch) -> ObjectiveOutput`. It returns the *sum* of the
per-target losses, never a mean, together with how many targets went into that sum: the loop adds the
target counts of all micro-batches of one optimizer step and divides every micro-batch's `loss_sum` by that
total, so a step's loss is the mean over its trained tokens (or examples) however the step is split into
micro-batches. `count(batch)` gives the same count from the batch alone, on the host, before any forward
pass: the loop needs the step's total before the first backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class ObjectiveOutput:
    """`loss_sum`: 0-dim tensor, the summed loss (graph attached in training).
    `n_targets`: how many tokens (causal LM) or examples (classification) the sum runs over.
    `metrics`: extra tensors that are *sums* over the batch too (e.g. `correct`, or the counts of a flattened
    `confusion` matrix), so that they add up across micro-batches and evaluation batches; they stay tensors
    so that the hot path never syncs."""

    loss_sum: torch.Tensor
    n_targets: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """What the loop needs from an objective."""

    #: "causal_lm" or "classify": names the task for logs and for which evaluation metrics apply.
    task: str

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput: ...
