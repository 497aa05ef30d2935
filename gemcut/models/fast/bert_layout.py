"""The BERT-layout encoder the fast patches are written for, and the check that names what they rely on.

    python -m pytest -q tests/test_fast.py

The patches in this folder call parts of transformers' BERT-family modules directly (a self-attention's
`query`, `key`, `value`, `scaling`, a layer's `feed_forward_chunk`, ...) instead of their forwards. A
transformers release that renames or moves one of them would make a patch fail in an obscure place, or
fall back without saying so. So each patch declares what it relies on as attribute paths from the
classifier's base model (`RELIES_ON` in its module: `encoder.layer[*].attention.self.query`, where `[*]`
means every layer and `[-1]` the last), `missing` reads them on a real model and names what is gone by
class (`BertSelfAttention.scaling`), and `require` turns that into an error naming the patch.
tests/test_fast.py checks every patch against every supported head of the installed transformers.
"""

from __future__ import annotations

import re

import torch
import transformers

from gemcut.errors import GemcutError
from gemcut.models.pooling import classifier_encoder, first_token_classifier

# The attention implementations SDPA (or the explicit attention of fast dropout) can stand in for.
SDPA_COMPATIBLE = ("sdpa", "eager")
_STEP = re.compile(r"^(\w+)(?:\[(\*|-?\d+)\])?$")


class FastPathError(GemcutError):
    """A speed trick cannot run on the installed transformers: something it relies on has moved."""


def patchable_encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The encoder of the first-token classifier inside `model` when the patches are meant for it: one of
    pooling.FIRST_TOKEN_HEADS, with attention SDPA can stand in for, and not a decoder or cross-attention
    configuration. None for any other model (the patches leave it alone)."""
    classifier = first_token_classifier(model)
    if classifier is None:
        return None
    config = classifier.config
    if getattr(config, "_attn_implementation", None) not in SDPA_COMPATIBLE:
        return None
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    return classifier_encoder(classifier)


def missing(model: torch.nn.Module, relies_on: tuple[str, ...]) -> list[str]:
    """What of `relies_on` (paths from the base model of the first-token classifier in `model`) is not there,
    as "Class.attribute" names, each once; empty when everything is."""
    classifier = first_token_classifier(model)
    base = getattr(classifier, classifier.base_model_prefix, None) if classifier is not None else None
    if base is None:
        return [f"{type(model).__name__}.base_model"]
    gone: list[str] = []
    for path in relies_on:
        objects = [base]
        for step in path.split("."):
            name, index = _STEP.match(step).groups()
            found = []
            for obj in objects:
                if not hasattr(obj, name):
                    where = f"{type(obj).__name__}.{name}"
                    if where not in gone:
                        gone.append(where)
                    continue
                value = getattr(obj, name)
                if index is None:
                    found.append(value)
                elif index == "*":
                    found.extend(value)
                else:
                    found.append(value[int(index)])
            objects = found
    return gone


def require(model: torch.nn.Module, patch: str, relies_on: tuple[str, ...]) -> None:
    """Raise a FastPathError naming `patch` and each attribute of `relies_on` that `model` lacks."""
    gone = missing(model, relies_on)
    if gone:
        raise FastPathError(f"the {patch} speed trick (gemcut/models/fast/{patch}.py) relies on {', '.join(gone)}, which "
                            f"transformers {transformers.__version__} does not have; set train.fast=false to run "
                            "transformers' own forwards, or install the transformers version gemcut was tested with")
