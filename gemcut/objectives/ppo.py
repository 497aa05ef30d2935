"""PPO for language models: per-token KL-shaped rewards, GAE, clipped policy and value losses.

    python -m pytest -q tests/test_rl.py       # batches come from gemcut/train/rollouts.py

Schulman et al., "Proximal Policy Optimization Algorithms" (2017), eq. 7 (clipped surrogate) and eq. 11-12
(generalised advantage estimation, from Schulman et al., "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", 2016), applied to text as in Ziegler et al., "Fine-Tuning Language
Models from Human Preferences" (2019) and Ouyang et al. (2022): each generated token is an action, the
reward model's score arrives at the last token, and every token pays -kl_coef * (log pi_old - log ref):

    r_t   = -kl_coef * (logp_old_t - ref_logp_t)  + [t = last] * R
    delta = r_t + gamma V_{t+1} - V_t;   A_t = sum_k (gamma lam)^k delta_{t+k};   return_t = A_t + V_t
    L_pi  = max(-A rho, -A clip(rho, 1-eps, 1+eps))
    L_V   = 1/2 max((V - ret)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - ret)^2)

Advantages are whitened over the batch's generated tokens (as the reference implementations do). The loss
is summed over generated tokens (`n_targets` = tokens); `VALUE_COEF` weighs the value loss.
"""

from __future__ import annotations

import torch

from gemcut.objectives.base import ObjectiveOutput
from gemcut.objectives.rollout_forward import rollout_forward

VALUE_COEF = 0.5  # weight of the value loss in the shared-trunk objective (Schulman et al. 2017, eq. 9's c1)


def shaped_rewards(scores: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float) -> torch.Tensor:
    """[N,T] per-token rewards: the KL penalty on every generated token, the score added at the last one."""
    mask = mask.float()
    rewards = -kl_coef * (old_logp - ref_logp) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores.float()
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, [N,T] each, over right-padded generated tokens
    (V after the last generated token is 0: the episode ends there)."""
    mask = mask.float()
    values = values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, adv + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, moments=None) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (masked-out entries become 0). `moments`, when given,
    adds up the [count, sum, sum of squares] over all the processes of a run (the mean and variance are
    then those of the whole step's tokens), computed in float64."""
    m = mask.float()
    if moments is None:
        n = m.sum().clamp(min=1)
        mean = (x * m).sum() / n
        var = (((x - mean) * m) ** 2).sum() / n
        return (x - mean) * torch.rsqrt(var + eps) * m
    xd, md = x.double(), m.double()
    n, total, squares = moments(torch.stack([md.sum(), (xd * md).sum(), (xd * xd * md).sum()])).tolist()
    mean = total / max(n, 1.0)
    var = max(squares / max(n, 1.0) - mean * mean, 0.0)
    return (x - mean) * float((var + eps) ** -0.5) * m


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip_range: float,
             value_clip: float) -> ObjectiveOutput:
    """All inputs [N,T] over generated tokens. Returns the summed policy + VALUE_COEF * value loss;
    metrics (sums over tokens): policy_loss, value_loss, clip_frac, value_clip_frac."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    v_loss = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    total = ((pg + VALUE_COEF * v_loss) * mask).sum()
    metrics = {
        "policy_loss": (pg * mask).sum().detach(),
        "value_loss": (v_loss * mask).sum().detach(),
        "clip_frac": (((ratio - 1).abs() > clip_range).float() * mask).sum(),
        "value_clip_frac": (((values - old_values).abs() > value_clip).float() * mask).sum(),
    }
    return ObjectiveOutput(total, int(mask.sum()), metrics)


class PPO:
    """The objective over rollout batches that carry advantages, returns and the old values: the policy and
    its value head (a PolicyWithValueHead, gemcut/models/value_head.py) in one forward. One target per
    generated token."""

    task = "ppo"
    logged = ("clip_frac", "policy_loss", "value_loss", "value_clip_frac")

    def __init__(self, *, clip_range: float, value_clip: float):
        self.clip_range, self.value_clip = clip_range, value_clip

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].sum())

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logp, _, values = rollout_forward(model, batch)
        return ppo_loss(logp, batch["old_logp"], batch["advantages"], values, batch["old_values"], batch["returns"],
                        batch["mask"], clip_range=self.clip_range, value_clip=self.value_clip)
