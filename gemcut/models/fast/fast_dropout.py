"""Dropout with a cheaper random draw: 16 random bits per element instead of a Bernoulli sample.

    python -m pytest -q tests/test_fast_dropout.py

On a CPU, `nn.Dropout` spends most of its time drawing the mask: `bernoulli_` asks torch's Mersenne
Twister for one number per element, serially. Fine-tuning all-MiniLM-L6-v2 with its own dropout (0.1 on
the embeddings, the attention probabilities and both residual branches of every layer), those draws were
11% of a training step's CPU time in a profile on a 2-core AVX2 machine, more than every other op but the
matrix multiplies. This module draws one 64-bit word per four elements from the same generator
(`torch.randint`, so `torch.manual_seed` and gemcut's saved RNG state still fix every mask) and compares
each 16-bit lane with a threshold. Forward and backward of one dropout site then cost about a third of
what `F.dropout` costs (`bench/dropout_mask.py`; figures in docs/benchmarks.md).

What changes and what does not:
- Each element is still kept independently with probability 1 - p, where p is rounded to a multiple of
  2^-16 (0.1 becomes 6554/65536 = 0.1000061); kept elements are scaled by 1 / (keep probability) of the
  rounded p, so the expected output equals the input exactly, as with `nn.Dropout`.
- The masks are different draws from the one generator than torch's would be: a run is reproducible
  with itself, not bitwise with a run that uses `nn.Dropout`. `train.fast_dropout: false` (or
  `train.fast: false`, which turns off every trick of this folder) keeps torch's dropout.
- Backward multiplies by the same saved multiplier (0 or the scale), as `nn.Dropout` does.

`use_fast_dropout(model)` swaps every `nn.Dropout` module (the module holds no weights, so parameter
names and checkpoints do not change) and, for encoder layers with the BERT layout (BERT, RoBERTa,
XLM-R, ELECTRA, MiniLM), routes the attention-probability dropout, which those layers hand to SDPA as
`dropout_p`, through the same mask. In eval mode everything is the identity, as before. `apply_fast`
(gemcut/models/fast/__init__.py) calls it for every task; on a BERT-family classifier it first checks
RELIES_ON (bert_layout.py), so a renamed attribute is an error naming it rather than a silent fallback.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from gemcut.models.fast.bert_layout import SDPA_COMPATIBLE, patchable_encoder, require

LANES = 4  # 16-bit lanes per 64-bit random word
LANE_VALUES = 1 << 16
SELF_ATTENTION_PARTS = ("query", "key", "value", "attention_head_size", "scaling", "dropout")
# What `_self_attention_forward` reads on a BERT-family classifier (paths from the base model; bert_layout.py).
RELIES_ON = tuple(f"encoder.layer[*].attention.self.{part}" for part in SELF_ATTENTION_PARTS)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(bool mask of `shape` with each element True with probability 1 - p', the scale 1 / (1 - p')).

    p' is p rounded to a multiple of 2^-16. The mask reads 16-bit lanes of 64-bit words from torch's
    default generator for `device`."""
    n = 1
    for size in shape:
        n *= size
    dropped_values = round(p * LANE_VALUES)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + LANES - 1) // LANES,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n].view(shape)
    # A lane is uniform over [-2^15, 2^15): `dropped_values` of those 2^16 values drop the element.
    mask = lanes >= -(1 << 15) + dropped_values
    return mask, LANE_VALUES / (LANE_VALUES - dropped_values)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)` with the mask from `keep_mask`."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    mask, scale = keep_mask(x.shape, p, x.device)
    # One float multiplier saved for backward, as nn.Dropout saves: multiplying by the bool mask and a
    # scalar costs two casts forward and back (about 2 ms more per 600k elements on a CPU).
    return x * mask.to(x.dtype).mul_(scale)


class FastDropout(nn.Dropout):
    """A drop-in `nn.Dropout` (same `p`, same repr) whose training-mode mask comes from `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fast_dropout(x, self.p, self.training)
        if self.inplace and out is not x:
            return x.copy_(out)
        return out


def attention_with_dropout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, *, dropout_p: float, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with fast dropout on the probabilities.

    SDPA with `dropout_p` > 0 on a CPU runs these same steps (its math path; the fused kernels take no
    dropout), drawing the mask with `bernoulli_`. The mask follows transformers' convention, which is
    SDPA's: a bool mask keeps True, a float mask is added to the scores."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout_p)
    return torch.matmul(probs, value)


def _self_attention_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            *args, **kwargs):
    """A BERT-layout self-attention in training mode, with its probability dropout drawn by `keep_mask`."""
    if not self.training or self.dropout.p == 0.0 or args or any(
            kwargs.get(name) is not None for name in ("cache", "past_key_values", "encoder_hidden_states")):
        return self._forward_with_torch_dropout(hidden_states, attention_mask, *args, **kwargs)
    batch, length, _ = hidden_states.shape
    heads = (batch, length, -1, self.attention_head_size)
    query = self.query(hidden_states).view(heads).transpose(1, 2)
    key = self.key(hidden_states).view(heads).transpose(1, 2)
    value = self.value(hidden_states).view(heads).transpose(1, 2)
    context = attention_with_dropout(query, key, value, attention_mask, dropout_p=self.dropout.p, scale=self.scaling)
    return context.transpose(1, 2).reshape(batch, length, -1), None


def _bert_self_attention(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("SelfAttention") and all(hasattr(module, part) for part in SELF_ATTENTION_PARTS)
            and not getattr(module, "is_decoder", False) and not getattr(module, "is_causal", False)
            and getattr(getattr(module, "config", None), "_attn_implementation", None) in SDPA_COMPATIBLE)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap `model`'s dropout for the fast kind (see the module docstring); returns how many sites changed.
    Raises FastPathError when `model` is a BERT-family classifier missing something RELIES_ON names."""
    if patchable_encoder(model) is not None:
        require(model, "fast_dropout", RELIES_ON)
    changed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(module, name, fast)
                changed += 1
        if _bert_self_attention(module) and not _patched(module):
            module._forward_with_torch_dropout = module.forward  # read only in this module
            module.forward = types.MethodType(_self_attention_forward, module)
            changed += 1
    return changed


def _patched(module: nn.Module) -> bool:
    return getattr(module.forward, "__func__", None) is _self_attention_forward


def installed(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a peft / DDP wrapper) draws any dropout mask the fast way."""
    return any(isinstance(module, FastDropout) or _patched(module) for module in model.modules())
