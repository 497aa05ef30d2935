"""The policy's forward over a batch of rollouts: log-probs of the sampled tokens, entropy, values.

    python -m pytest -q tests/test_rl.py

A rollout batch (built by gemcut/train/rollouts.py) holds left-padded prompts followed by the sampled
completions: `input_ids`, `attention_mask`, `position_ids` [n, P+T] and the completions alone, `tokens` and
`mask` [n, T]. Column P-1+t of the logits predicts completion token t. GRPO's and PPO's losses and the
rollout source's pi_old / reference log-probs all come from this one function.
"""

from __future__ import annotations

import torch

from gemcut.models.numerics import token_logps
from gemcut.models.value_head import PolicyOutput

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def rollout_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs [n,T] of the sampled tokens, entropy [n,T] (detached), values [n,T] or None). `model` is a
    causal LM, or a PolicyWithValueHead (gemcut/models/value_head.py), whose values come along."""
    T = batch["tokens"].shape[1]
    out = model(**{k: batch[k] for k in MODEL_INPUTS}, use_cache=False)
    logits = out.logits[:, -T - 1:-1].float()
    logp = token_logps(logits, batch["tokens"])
    with torch.no_grad():
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    values = out.values[:, -T - 1:-1] if isinstance(out, PolicyOutput) else None
    return logp, entropy, values
