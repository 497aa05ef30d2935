"""PPO's value head on the policy's last hidden state, and the module a PPO run trains.

    python -m pytest -q tests/test_rl.py

`PolicyWithValueHead(policy)` is what a PPO run trains and checkpoints: the LoRA policy plus a linear value
head V(h_t) = w . h_t + b, its parameters named `policy.*` and `value_head.*` (`load_run` rebuilds the same
wrapper to read a PPO checkpoint); `final/value_head.safetensors` holds the head of a finished run, and
`load_run` attaches it again (`LoadedRun.value_head`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gemcut.errors import GemcutError
from gemcut.models.numerics import unwrap_peft

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(torch.nn.Module):
    """V(state) = w . h_t + b. Zero-initialised, so the first advantages are the raw returns and the head's
    start does not depend on the RNG."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


@dataclass
class PolicyOutput:
    logits: torch.Tensor  # [B, T, V]
    values: torch.Tensor  # [B, T]


class PolicyWithValueHead(torch.nn.Module):
    """The policy (a peft model) and its value head as one module: `forward` returns the policy's logits and
    the head's value at every position, in one pass over the shared trunk."""

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        hidden = unwrap_peft(policy).config.hidden_size
        self.policy = policy
        self.value_head = value_head if value_head is not None else ValueHead(hidden)
        self.value_head.to(next(policy.parameters()).device)

    def forward(self, **inputs) -> PolicyOutput:
        out = self.policy(**inputs, output_hidden_states=True)
        return PolicyOutput(out.logits, self.value_head(out.hidden_states[-1]))

    def disable_adapter(self):
        """The reference model: the policy with its adapter off (see gemcut/objectives/dpo.py's `reference`)."""
        return self.policy.disable_adapter()


def save_value_head(head: ValueHead, folder: Path) -> Path:
    path = Path(folder) / VALUE_HEAD_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def load_value_head(folder: Path, hidden_size: int) -> ValueHead | None:
    """The value head saved in `folder`, or None when it has none (a run that is not PPO)."""
    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        return None
    head = ValueHead(hidden_size)
    try:
        head.load_state_dict(load_file(str(path)))
    except Exception as e:  # safetensors' and torch's errors for a damaged or mismatched file
        raise GemcutError(f"{path}: not a value head for a model of hidden size {hidden_size} ({e}); "
                          "train the run again or remove the file") from e
    return head
