"""The KV cache argument under its name in the installed transformers.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (and the output field with it);
the old name still works there with a deprecation warning on every call, and is the only name before.
gemcut supports transformers >= 5.0, so it asks the model which name its forward takes.

The server's running batch (gemcut/serve/running_batch.py) adds rows to a DynamicCache and removes them
between decode steps. transformers can select rows but not join them; `join_rows`, `keep_rows` and
`drop_leading_columns` reach DynamicLayer's `keys`/`values` tensors ([rows, kv_heads, columns, head_dim]),
as the library's own methods do. tests/test_serve_batching.py checks the joined rows decode as alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_argument(model) -> str:
    """"cache" when the (peft-unwrapped) model's forward takes it, else "past_key_values"."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output) -> Any:
    """The cache a forward pass returned, under either name (None when it returned none)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def rows_joinable(cache) -> bool:
    """Whether each layer of `cache` is a plain growing one (no sliding window, no fixed size), so that rows
    can be padded on the left, joined and dropped."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _left_padded(t: torch.Tensor, columns: int) -> torch.Tensor:
    if columns <= 0:
        return t
    return torch.cat([t.new_zeros(t.shape[:-2] + (columns, t.shape[-1])), t], dim=-2)


def join_rows(cache, other) -> int:
    """Append the rows of `other` to `cache` (both `rows_joinable`), left-padding the shorter with zero
    columns; returns the columns added on the left of `cache`'s own rows (0 when it was the longer). The
    caller masks the padding columns."""
    width, other_width = cache.get_seq_length(), other.get_seq_length()
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([_left_padded(mine.keys, other_width - width), _left_padded(theirs.keys, width - other_width)])
        mine.values = torch.cat([_left_padded(mine.values, other_width - width), _left_padded(theirs.values, width - other_width)])
    return max(0, other_width - width)


def keep_rows(cache, rows: list[int]) -> None:
    """Keep only `rows` (in that order) of every layer."""
    index = torch.tensor(rows, dtype=torch.long, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)


def drop_leading_columns(cache, columns: int) -> None:
    """Remove the first `columns` columns of every layer (padding that no row attends to)."""
    if columns > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]


def copy_of(cache):
    """A DynamicCache holding a copy of `cache`'s tensors (a shared prefix reused by many prompts: growing
    the copy leaves the original as it was)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])
