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
(gemcut/objectives/chunked_ce.py). It is applied by `load_base` to the heads listed in FIRST_TOKEN_HEADS
whose last layer has the BERT layout; anything else is left as it was. The patch replaces the `forward` of
one layer instance, so parameter names, checkpoints and exports do not change. One consequence: such a
model's `last_hidden_state` (and its last `hidden_states` entry) has length 1. gemcut never reads them
from a classifier; code that wants per-token features should load the model without `load_base`.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Heads that read only position 0 of the last hidden state (checked against transformers 5's modeling code).
FIRST_TOKEN_HEADS = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "ElectraForSequenceClassification",
)
# The attention the patched layer computes itself must be what the model would have used.
SDPA_COMPATIBLE = ("sdpa", "eager")


def bert_self_attention(module: torch.nn.Module) -> bool:
    """A self-attention module with BERT's parts: separate query/key/value projections and a probability dropout."""
    return all(hasattr(module, name) for name in ("query", "key", "value", "attention_head_size", "scaling", "dropout"))


def bert_layout(layer: torch.nn.Module) -> bool:
    """An encoder layer with BERT's layout: self-attention, its output block, then the feed-forward block."""
    attention = getattr(layer, "attention", None)
    return (
        bert_self_attention(getattr(attention, "self", None))
        and hasattr(attention, "output") and hasattr(layer, "feed_forward_chunk")
        and not getattr(layer, "is_decoder", False) and not getattr(layer, "add_cross_attention", False)
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


def first_token_encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The encoder (with its `layer` list) of a first-token classifier whose attention SDPA can stand in for;
    None for any other model."""
    if type(model).__name__ not in FIRST_TOKEN_HEADS:
        return None
    if getattr(model.config, "_attn_implementation", None) not in SDPA_COMPATIBLE:
        return None
    encoder = getattr(getattr(model, model.base_model_prefix, None), "encoder", None)
    return encoder if getattr(encoder, "layer", None) else None


def last_layer_reads_first_token_only(model: torch.nn.Module) -> bool:
    """Patch the last encoder layer of a first-token classifier; True when patched, False when not eligible."""
    encoder = first_token_encoder(model)
    if encoder is None or not bert_layout(encoder.layer[-1]):
        return False
    layers = encoder.layer
    layers[-1].forward = types.MethodType(_first_token_forward, layers[-1])
    return True
