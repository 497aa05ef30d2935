"""Encoder classifiers read one position: let their last layer compute only that one.

    python -m pytest -q tests/test_first_token.py

A BERT-style sequence classifier puts its head on the first token ([CLS] / <s>): the pooler of
`BertForSequenceClassification` reads `last_hidden_state[:, 0]`, the heads of RoBERTa, XLM-R and ELECTRA
read `features[:, 0, :]`. Every other position of the last layer's output is computed and thrown away. In
that layer the keys and values still need every position (the first token attends to all of them), but
the query, the attention output projection and the feed-forward block, 10 of the layer's 12 d^2 matmul
units per token, are needed at position 0 alone. For all-MiniLM-L6-v2 that removes about 14% of the
encoder's matmul FLOPs in the forward pass and as much in the backward pass, and the logits, the loss and
every gradient are the same as before (up to float rounding; tests/test_first_token.py checks both).

The same trick is why the causal-LM objective runs its LM head on target positions only
(gemcut/objectives/chunked_ce.py). `apply_fast` (gemcut/models/fast/__init__.py, with `train.fast` on)
applies it to the heads of pooling.FIRST_TOKEN_HEADS that do not pool by mean (gemcut/models/pooling.py),
with sdpa or eager attention; anything else is left as it was. The patch replaces the `forward` of one
layer instance, so parameter names, checkpoints and exports do not change. One consequence: such a
model's `last_hidden_state` (and its last `hidden_states` entry) has length 1. gemcut never reads them
from a classifier; code that wants per-token features should not apply the fast tricks (`train.fast: false`).
What the patch reads of transformers' modules is RELIES_ON, checked before it is applied (bert_layout.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from gemcut.models.fast.bert_layout import patchable_encoder, require

# What `_first_token_forward` calls on the last encoder layer (paths from the base model; bert_layout.py).
RELIES_ON = (
    "encoder.layer[-1].attention.self.query",
    "encoder.layer[-1].attention.self.key",
    "encoder.layer[-1].attention.self.value",
    "encoder.layer[-1].attention.self.attention_head_size",
    "encoder.layer[-1].attention.self.scaling",
    "encoder.layer[-1].attention.self.dropout",
    "encoder.layer[-1].attention.output",
    "encoder.layer[-1].feed_forward_chunk",
)


def _first_token_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         *args, **kwargs) -> torch.Tensor:
    """The layer's own computation, with queries (and everything after attention) at position 0 only."""
    attn = self.attention.self
    batch, length, _ = hidden_states.shape
    heads = (-1, attn.attention_head_size)
    first = hidden_states[:, :1].contiguous()  # a fresh, aligned block: the same kernels every call
    query = attn.query(first).view(batch, 1, *heads).transpose(1, 2)
    key = attn.key(hidden_states).view(batch, length, *heads).transpose(1, 2)
    value = attn.value(hidden_states).view(batch, length, *heads).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[..., :1, :]  # the mask row of the one query kept
    # Both of transformers' masks mean what SDPA's do: a bool mask keeps True, a float mask is added.
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask,
        dropout_p=attn.dropout.p if self.training else 0.0, scale=attn.scaling,
    )
    context = context.transpose(1, 2).reshape(batch, 1, -1)
    attention_output = self.attention.output(context, first)
    return self.feed_forward_chunk(attention_output)


def last_layer_reads_first_token_only(model: torch.nn.Module) -> bool:
    """Patch the last encoder layer of the first-token classifier in `model` (which must read the first
    token: not mean-pooled); True when patched (or already), False when `model` is not one the patch is for.
    Raises FastPathError naming what is missing when transformers moved something RELIES_ON names."""
    encoder = patchable_encoder(model)
    if encoder is None:
        return False
    require(model, "first_token", RELIES_ON)
    last = encoder.layer[-1]
    if not _patched(last):
        last.forward = types.MethodType(_first_token_forward, last)
    return True


def _patched(layer: torch.nn.Module) -> bool:
    return getattr(layer.forward, "__func__", None) is _first_token_forward


def installed(model: torch.nn.Module) -> bool:
    """Whether a layer of `model` (or of the model inside a peft / DDP wrapper) computes the first token only."""
    return any(_patched(module) for module in model.modules())
