"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay.

    python -m pytest -q tests/test_loop.py -k schedule

Warmup ramps the multiplier from 1/(warmup+1) to 1 so the first step already moves (a multiplier of 0
would waste it); cosine decays to 0 at `total_steps` (Loshchilov & Hutter, "SGDR", 2017, without restarts).
The scheduler is a plain `LambdaLR`, whose state_dict holds only numbers, so it saves and reloads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math

import torch


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """`train.warmup_steps` when set, else `warmup_ratio` of the total, rounded up."""
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return min(math.ceil(warmup_ratio * total_steps), total_steps)


def lr_multiplier(step: int, *, total_steps: int, warmup: int, kind: str) -> float:
    """The factor applied to the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule: unknown schedule {kind!r}; use cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup: int, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps=total_steps, warmup=warmup, kind=kind)
    )
