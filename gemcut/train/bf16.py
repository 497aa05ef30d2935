"""Frozen LoRA base weights stored in bf16 under bf16 autocast: the same results in half the memory.

    python -m pytest -q tests/test_loop.py -k bf16
"""

from __future__ import annotations

import torch


def store_frozen_linears_in_bf16(model: torch.nn.Module) -> int:
    """Under bf16 autocast, keep the frozen weights of a LoRA model's linear layers in bf16; returns how many.

    Autocast casts every Linear's weight and bias to bf16 at every forward, so storing the frozen ones in
    bf16 once gives bit-identical results, without re-casting the base model each step, in half the memory.
    Only for peft models, whose final save holds the adapter alone; a weight tied to an embedding (a tied LM
    head) stays as it is, because the embedding's output is not autocast."""
    peft = getattr(model, "policy", model)  # PPO trains the policy and its value head together
    if not hasattr(peft, "peft_config") or any(getattr(c, "use_dora", False) for c in peft.peft_config.values()):
        return 0  # DoRA reads the base weight in its own (non-autocast) arithmetic
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and id(module.weight) not in tied \
                and module.weight.dtype == torch.float32:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            n += 1
    return n
