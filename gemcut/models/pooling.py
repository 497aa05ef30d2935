"""How an encoder classifier pools its tokens: the first token (BERT's [CLS]) or the mean of all of them.

    python -m pytest -q tests/test_pooling.py

transformers' sequence-classification heads for BERT, RoBERTa, XLM-R and ELECTRA read the first token.
That suits a model pre-trained with a first-token objective, but sentence-transformers checkpoints such as
all-MiniLM-L6-v2 were trained to be read by the mean over their tokens (their `1_Pooling/config.json`
says so): their first token was never asked to summarise the sentence, and the BERT pooler on top of it
was never trained. `model.pooling` picks the reading:

- `auto` (the default): what the checkpoint says: `classifier_pooling` in its config.json (written by
  gemcut into every classifier it saves, and ModernBERT's own field name); else, when the head is new,
  the pooling of a sentence-transformers checkpoint (`modules.json` -> the Pooling module's config: mean
  tokens -> `mean`, CLS token -> `cls`); else `cls` (a classifier trained by plain transformers read its
  first token);
- `cls`: the first token, what `AutoModelForSequenceClassification` does;
- `mean`: each row's mean over its real tokens (attention mask 1), the way sentence-transformers,
  SetFit and ModernBERT's `classifier_pooling="mean"` read it.

Mean pooling needs no new weights: the encoder hands the head the mean where the head reads the first
token, so the head's own layers (BERT's pooler dense + tanh, RoBERTa's dense + tanh + projection) stay
as they are and checkpoints keep their parameter names. It runs inside the padding-free encoder
(gemcut/models/padding_free.py), which computes the last layer at every real token and averages them
per row; its padded fallback (left padding, activation checkpointing) averages under the mask. A cls
model also gets the last-layer-at-the-first-token-only patch (gemcut/models/first_token.py).

`prepare_classifier` is the one place these are installed; `load_base`, `load_run` and `gemcut serve`
(runs, merged and int8 exports) call it, so a classifier reads its tokens the same way in training,
evaluation, export and serving. A merged export loaded by plain transformers does not know about mean pooling and
reads the first token: the export records the pooling in export.json and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

from gemcut.errors import ConfigError

log = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]
CONFIG_FIELD = "classifier_pooling"


def sentence_transformers_pooling(source: str | Path) -> Pooling | None:
    """The pooling a local sentence-transformers checkpoint was trained with; None when `source` is not one
    (or pools some other way: max, weighted mean, last token)."""
    folder = Path(source)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        pooling_dir = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        settings = json.loads((folder / pooling_dir / "config.json").read_text(encoding="utf-8"))
    except (StopIteration, OSError, ValueError, AttributeError, TypeError):
        return None
    modes = {key.removeprefix("pooling_mode_") for key, on in settings.items() if key.startswith("pooling_mode_") and on is True}
    if modes == {"mean_tokens"}:
        return "mean"
    if modes == {"cls_token"}:
        return "cls"
    return None


def checkpoint_pooling(model: torch.nn.Module, source: str | Path | None) -> Pooling | None:
    """The pooling `model` (loaded from `source`) says it wants: its config's field, else sentence-transformers'
    for a new head. A checkpoint that is already a sequence classifier without the field was trained by
    transformers, which reads the first token (None: the caller's default)."""
    recorded = getattr(model.config, CONFIG_FIELD, None)
    if recorded in ("cls", "mean"):
        return recorded
    if any(str(a).endswith("ForSequenceClassification") for a in getattr(model.config, "architectures", None) or ()):
        return None
    return sentence_transformers_pooling(source) if source is not None else None


def prepare_classifier(model: torch.nn.Module, setting: str = "auto", source: str | Path | None = None) -> Pooling | None:
    """Install the token reading of an encoder classifier; returns the pooling used, None when `model` is
    not a first-token classifier gemcut handles (it is then left as it was and pools its own way).

    `setting` is `model.pooling` (auto, cls, mean); `source` the folder the weights came from (for auto).
    The choice is written to `model.config.classifier_pooling`, so every folder the model is saved to
    pools the same way when gemcut loads it again."""
    from gemcut.models.first_token import first_token_encoder, last_layer_reads_first_token_only
    from gemcut.models.padding_free import use_padding_free_encoder

    if setting not in ("auto", "cls", "mean"):
        raise ConfigError(f"model.pooling={setting!r}: choose auto, cls or mean")
    encoder = first_token_encoder(model)
    if encoder is None:
        if setting == "mean":
            raise ConfigError(f"model.pooling=mean: {type(model).__name__} with "
                              f"{getattr(model.config, '_attn_implementation', None)} attention is not a classifier gemcut "
                              "can mean-pool (BERT, RoBERTa, XLM-R or ELECTRA heads with sdpa or eager attention); "
                              "use model.pooling=auto")
        return None
    pooling: Pooling = setting if setting != "auto" else (checkpoint_pooling(model, source) or "cls")
    if getattr(encoder, "pooling", pooling) != pooling:
        # The cls patch computes the last layer at the first token alone; a mean would average that one token.
        raise ConfigError(f"this {type(model).__name__} already pools by {encoder.pooling}; load it again for {pooling}")
    padding_free = use_padding_free_encoder(model) or hasattr(encoder, "_forward_padded")
    if pooling == "mean" and not padding_free:
        raise ConfigError(f"model.pooling=mean: the layers of {type(model).__name__} do not have the BERT layout "
                          "the mean-pooling encoder is written for; use model.pooling=cls")
    encoder.pooling = pooling
    if pooling == "cls":
        # Exact, and only valid when the head reads the first token; the padding-free encoder's padded
        # fallback runs through this patched layer.
        last_layer_reads_first_token_only(model)
    setattr(model.config, CONFIG_FIELD, pooling)
    log.debug("%s pools by %s", type(model).__name__, "the mean of its tokens" if pooling == "mean" else "its first token")
    return pooling


def classifier_pooling(model: torch.nn.Module) -> Pooling | None:
    """The pooling installed on `model` (or the model inside a peft wrapper); None when none was installed."""
    for module in model.modules():
        pooling = getattr(module, "pooling", None)
        if hasattr(module, "_forward_padded") and pooling in ("cls", "mean"):
            return pooling
    return None
