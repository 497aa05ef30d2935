"""The KV cache argument under its name in the installed transformers.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (and the output field with it);
the old name still works there with a deprecation warning on every call, and is the only name before.
gemcut supports transformers >= 5.0, so it asks the model which name its forward takes.
"""

from __future__ import annotations

import inspect
from typing import Any


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
