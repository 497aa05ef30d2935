"""Direct Preference Optimization, with the reference model = the same model with its adapter off.

    gemcut train examples/dpo_chatterbot.yaml      # objective.kind: dpo, adapter.method: lora, from an SFT run
    python -m pytest -q tests/test_pref_losses.py

Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
(NeurIPS 2023), eq. 7:

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

where log pi(y|x) sums the log-probabilities of the completion tokens only. The implicit rewards
beta * (log pi - log ref) of the chosen and rejected completions, their margin and the preference accuracy
(chosen reward > rejected reward) are logged. The reference is the LoRA model under `disable_adapter()`
(the frozen base weights), as in torchtune's `lora_dpo_single_device` recipe: no second copy in memory.

Batch: `chosen_input_ids`/`chosen_labels` [B,T1] and `rejected_input_ids`/`rejected_labels` [B,T2],
labels aligned with input_ids (-100 on prompt and padding; `gemcut.models.numerics.sequence_logps` shifts), optional
`{side}_attention_mask`. Summed over pairs; `n_targets` = pairs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from gemcut.models.numerics import sequence_logps
from gemcut.objectives.base import ObjectiveOutput
from gemcut.objectives.reward import side_mask


@contextmanager
def reference(model: torch.nn.Module):
    """The reference policy: the same peft model with its adapters disabled, without gradients."""
    inner = getattr(model, "module", model)  # DDP wraps the peft model
    if not hasattr(inner, "disable_adapter"):
        raise TypeError("DPO and RL need a peft (LoRA) model: the reference is the model with its adapter disabled; "
                        "set adapter.method=lora")
    with torch.no_grad(), inner.disable_adapter():
        yield


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards (chosen, rejected); inputs are [B] summed log-probs."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def _pair_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    return (sequence_logps(model, batch["chosen_input_ids"], batch["chosen_labels"], side_mask(batch, "chosen")),
            sequence_logps(model, batch["rejected_input_ids"], batch["rejected_labels"], side_mask(batch, "rejected")))


class DPO:
    """DPO on a LoRA model; metrics are sums over pairs: chosen_reward, rejected_reward, margin, correct."""

    task = "dpo"

    def __init__(self, beta: float = 0.1):
        if beta <= 0:
            raise ValueError(f"DPO beta must be > 0, got {beta}")
        self.beta = beta

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        with reference(model):
            ref_c, ref_r = _pair_logps(model, batch)
        pol_c, pol_r = _pair_logps(model, batch)
        loss, r_c, r_r = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.beta)
        metrics = {"chosen_reward": r_c.sum(), "rejected_reward": r_r.sum(), "margin": (r_c - r_r).sum(),
                   "correct": (r_c > r_r).sum()}
        return ObjectiveOutput(loss.sum(), int(loss.shape[0]), metrics)
