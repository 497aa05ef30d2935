"""Validation during training: what the loop scores at each evaluation, and the samples it writes.

    python -m pytest -q tests/test_loop.py

A validation is a callable `validation(model, group) -> (metrics, samples)`; the loop calls it every
`train.eval_every` steps and at the end, inside the run's autocast, on every process of the run (each
scores its share, round-robin, and the sums are added up, so every process gets the same metrics and
takes the same early-stopping decision), and watches one of the metrics
(`train.early_stopping.metric`; auto: the task's own, gemcut/tasks.py) for the best checkpoint and early
stopping. `LossValidation` scores held-out examples with the run's objective; RL runs use
`gemcut.train.rollouts.RewardValidation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from gemcut.objectives.base import Objective
from gemcut.train.batches import Batch, deal, example_length
from gemcut.train.distributed import Group


class Validation(Protocol):
    """What the loop calls: `(metrics, samples)` for the model as it is now, the same on every process of
    `group`. It may switch the model to eval mode; it leaves it in train mode."""

    def __call__(self, model: torch.nn.Module, group: Group) -> tuple[dict[str, float], list[dict]]: ...


def macro_f1_from_confusion(flat_counts: torch.Tensor) -> float:
    """Macro-F1 over the classes that occur in the truth or the predictions of a flattened [C*C] confusion count
    (row = true class), the same set scikit-learn's f1_score(average="macro") averages over by default."""
    n_classes = int(round(flat_counts.numel() ** 0.5))
    m = flat_counts.reshape(n_classes, n_classes).double().cpu()
    tp, true, pred = m.diagonal(), m.sum(1), m.sum(0)
    present = (true + pred) > 0
    f1 = 2 * tp / (true + pred).clamp(min=1)
    return float(f1[present].mean()) if present.any() else 0.0


class LossValidation(Validation):
    """Mean loss over all validation targets; accuracy when the objective counts `correct`, macro-F1 when it
    counts a `confusion` matrix; plus `sample_fn(model)`'s generations (SFT) as samples."""

    def __init__(self, objective: Objective, examples: Sequence[dict], collate: Callable[[list[dict]], Batch], *,
                 batch_size: int, sample_fn: Callable[[torch.nn.Module], list[dict]] | None = None):
        self.objective, self.examples, self.collate, self.batch_size, self.sample_fn = objective, examples, collate, batch_size, sample_fn
        self.order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))  # less padding

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, group: Group) -> tuple[dict[str, float], list[dict]]:
        model.eval()
        device = next(model.parameters()).device
        loss, n, sums = torch.zeros((), device=device), 0, {}
        batches = [self.order[s:s + self.batch_size] for s in range(0, len(self.order), self.batch_size)]
        # Every process scores as many batches (fillers of weight 0 where its share is short): each forward of
        # a sharded model is a collective, and every process must name the same metrics in the same sums.
        mine, weights = deal(batches, 1, group)
        for (ids,), weight in zip(mine, weights):
            batch = {k: v.to(device) for k, v in self.collate([self.examples[i] for i in ids]).items()}
            out = self.objective(model, batch)
            loss += out.loss_sum.float() * weight
            n += out.n_targets * weight
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + v * weight
        totals = group.sum(torch.stack([loss.double(), torch.tensor(float(n), dtype=torch.float64, device=device)]))
        sums = {k: group.sum(torch.as_tensor(v, device=device)) for k, v in sorted(sums.items())}
        n = int(totals[1].item())
        result = {"val_loss": totals[0].item() / max(n, 1), "val_targets": n}
        confusion = sums.pop("confusion", None)
        if confusion is not None:
            result["val_macro_f1"] = macro_f1_from_confusion(confusion)
        for k, v in sums.items():  # metric sums become means over the targets; `correct` is accuracy
            result["val_accuracy" if k == "correct" else f"val_{k}"] = float(v) / max(n, 1)
        samples = self.sample_fn(model) if self.sample_fn is not None and group.main else []
        model.train()
        return result, samples
