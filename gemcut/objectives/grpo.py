"""GRPO: group-relative advantages and the clipped policy loss with a KL penalty to the reference.

    python -m pytest -q tests/test_rl.py       # batches come from gemcut/train/rollouts.py

Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (2024),
sec. 4.1, eq. 3: sample a group of G completions per prompt, score them, and use the reward standardised
within the group as every token's advantage (no value model):

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
    J   = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps_c, 1+eps_c) A_i) - beta KL_it ]
    rho_it = pi(o_it) / pi_old(o_it)
    KL_it  = ref/pi - log(ref/pi) - 1          (the unbiased, always-positive estimator of eq. 4)

The loss returned is -J summed over completions (each completion's token terms averaged over its length),
with `n_targets` = completions, so the loop's division gives the paper's 1/G mean.
"""

from __future__ import annotations

import torch

from gemcut.objectives.base import ObjectiveOutput
from gemcut.objectives.rollout_forward import rollout_forward


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """[N] rewards (groups of `group_size` consecutive completions of one prompt) -> [N] standardised within
    each group. A group whose rewards are all equal gets advantage 0 (it carries no signal)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    std = g.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.zeros_like(g[:, :1])
    return ((g - g.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1 >= 0 (Schulman, "Approximating
    KL divergence", 2020), evaluated on tokens sampled from pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, clip_range: float, kl_coef: float) -> ObjectiveOutput:
    """logp/old_logp/ref_logp/mask [N,T] over completion tokens (mask 1 where a token was generated),
    advantages [N]. Metrics (sums over completions): kl, clip_frac, ratio."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)
    kl = kl_k3(logp, ref_logp)
    per_token = -(surrogate - kl_coef * kl)
    lengths = mask.sum(-1).clamp(min=1)

    def seq_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum(-1) / lengths

    clipped = ((ratio - 1).abs() > clip_range).float()
    metrics = {"kl": seq_mean(kl).detach().sum(), "clip_frac": seq_mean(clipped).sum(), "ratio": seq_mean(ratio).detach().sum()}
    return ObjectiveOutput(seq_mean(per_token).sum(), int(logp.shape[0]), metrics)


class GRPO:
    """The objective over rollout batches (gemcut/train/rollouts.py): the policy's log-probs of the sampled
    tokens against pi_old, the reference and the group advantages the batch carries. One target per
    completion. `logged`: the metrics the loop averages into each step's line."""

    task = "grpo"
    logged = ("clip_frac",)  # the source logs the KL of the sampled completions

    def __init__(self, *, clip_range: float, kl_coef: float):
        self.clip_range, self.kl_coef = clip_range, kl_coef

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logp, _, _ = rollout_forward(model, batch)
        return grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["mask"],
                         clip_range=self.clip_range, kl_coef=self.kl_coef)
