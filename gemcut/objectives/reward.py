"""Reward model: a scalar head trained with the pairwise (Bradley–Terry) loss on ranked pairs.

    gemcut train examples/reward_chatterbot.yaml   # objective.kind: reward, data of the `preference` kind
    python -m pytest -q tests/test_pref_losses.py

Bradley & Terry, "Rank Analysis of Incomplete Block Designs: I. The Method of Paired Comparisons"
(Biometrika, 1952) model P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)); the reward model of
Stiennon et al., "Learning to summarize from human feedback" (2020) and Ouyang et al., "Training language
models to follow instructions with human feedback" (2022, eq. 1) minimises its negative log-likelihood:

    loss = -log sigmoid(r_chosen - r_rejected)

Batch (from `gemcut.data.collate.collate_preference`): `chosen_input_ids` [B,T1], `rejected_input_ids`
[B,T2], optional `chosen_attention_mask`/`rejected_attention_mask`; the model is a sequence classifier with
one output (`load_base(..., task="reward")`), whose logit at the last real token is the reward. The loss is
summed over pairs (`n_targets` = pairs); `correct` counts pairs ranked the right way (pairwise accuracy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemcut.objectives.base import ObjectiveOutput


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected), computed as softplus(r_rejected - r_chosen) (stable)."""
    return F.softplus(r_rejected.float() - r_chosen.float())


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen completion gets the strictly higher reward."""
    return float((r_chosen > r_rejected).float().mean()) if r_chosen.numel() else 0.0


def side_mask(batch: dict[str, torch.Tensor], side: str) -> torch.Tensor:
    """`{side}_attention_mask`, or all ones when the collator gave none (unpadded batch)."""
    ids = batch[f"{side}_input_ids"]
    return batch.get(f"{side}_attention_mask", torch.ones_like(ids))


def scalar_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] rewards: the single logit of a one-label sequence classifier."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if logits.shape[-1] != 1:
        raise ValueError(f"a reward model has one output, this one has {logits.shape[-1]}; load it with task='reward'")
    return logits.squeeze(-1).float()


class PairwiseReward:
    """Bradley–Terry loss over `chosen_*`/`rejected_*` pairs; metrics `correct` and `margin` are sums."""

    task = "reward"

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        r_c = scalar_rewards(model, batch["chosen_input_ids"], side_mask(batch, "chosen"))
        r_r = scalar_rewards(model, batch["rejected_input_ids"], side_mask(batch, "rejected"))
        loss = pairwise_loss(r_c, r_r)
        metrics = {"correct": (r_c > r_r).sum(), "margin": (r_c - r_r).detach().sum()}
        return ObjectiveOutput(loss.sum(), int(loss.shape[0]), metrics)
