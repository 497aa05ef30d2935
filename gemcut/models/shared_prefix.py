"""A prompt prefix shared by every row of a batch is computed once, not once per row.

    python -m pytest -q tests/test_shared_prefix.py

Instruction data puts the same tokens before every example: the chat template's header, the system
prompt, the instruction up to the example's text. In the quickstart that is 33 of about 70 tokens per
tweet. A decoder's keys and values at those positions depend only on those tokens, so one forward pass
of the prefix (batch 1) gives them for the whole batch; the rows then run only their own suffixes on top of
that cache. Training, validation, reference losses and generation all use it; the outputs are those of
the full forward pass up to float rounding, gradients included (the repeated cache's backward sums the
rows' gradients into the one prefix pass), which tests/test_shared_prefix.py checks.

What is not done with a shared prefix, and why:
- rows whose prefix is not the same real tokens at the same positions (left padding, packed rows);
- a model with active dropout: one prefix pass would share one dropout mask across the rows;
- activation checkpointing: transformers turns the KV cache off under it.
"""

from __future__ import annotations

import torch

from gemcut.models.kv_cache import returned_cache

# Below this many shared tokens the extra forward call costs more than it saves.
MIN_SHARED_TOKENS = 8


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """How many leading columns hold the same real token in every row, leaving each row at least one column."""
    if input_ids.shape[0] < 2 or input_ids.shape[1] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    if attention_mask is not None:
        same = same & attention_mask.bool().all(dim=0)
    differs = torch.nonzero(~same)
    length = int(differs[0, 0]) if len(differs) else input_ids.shape[1]
    return min(length, input_ids.shape[1] - 1)


def prefix_to_share(input_ids: torch.Tensor, attention_mask: torch.Tensor, predicting: torch.Tensor) -> int:
    """Leading columns to run once for the whole batch, 0 when too few to pay for the extra forward call.

    The common real prefix of the rows (`common_prefix_length`), cut before the first column whose hidden
    state predicts a target: `predicting` [B, T'] (T' <= T) marks those columns, and a column run in the
    prefix pass returns no hidden state of its own."""
    shared = common_prefix_length(input_ids, attention_mask)
    first = torch.nonzero(predicting.any(dim=0))
    if len(first):
        shared = min(shared, int(first[0, 0]))
    return shared if shared >= MIN_SHARED_TOKENS else 0


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward pass in the current mode would draw any dropout mask."""
    if not model.training:
        return False
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        p = getattr(module, "attention_dropout", 0.0)  # attention dropout inside the attention kernel call
        if isinstance(p, float) and p > 0:
            return True
    return False


def uses_activation_checkpointing(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def shared_prompt_length(prompts) -> int:
    """Tokens at the start of every prompt (lists of ids), leaving each prompt at least one token of its own."""
    if len(prompts) < 2:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def prefix_cache(model: torch.nn.Module, prefix_ids: torch.Tensor, rows: int, **kwargs):
    """The KV cache of `prefix_ids` [1, P], run once and repeated for `rows` rows (differentiable).

    `model` is a decoder or a causal LM (then pass `logits_to_keep=1`: the prefix's logits are not needed)."""
    ones = torch.ones_like(prefix_ids)
    cache = returned_cache(model(input_ids=prefix_ids, attention_mask=ones, use_cache=True, **kwargs))
    cache.batch_repeat_interleave(rows)
    return cache


def suffix_positions(attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Position ids of the columns from `start` on: each row counts its real tokens (left padding skipped)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
