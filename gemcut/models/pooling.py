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
- `cls`: the first token, what `AutoModelForSequenceClassification` does (no hook is installed);
- `mean`: each row's mean over its real tokens (attention mask 1), the way sentence-transformers,
  SetFit and ModernBERT's `classifier_pooling="mean"` read it.

Mean pooling needs no new weights: a forward hook on the encoder (torch's `register_forward_hook`, no
forward of transformers replaced) puts each row's mean at position 0 of the encoder's output, where the
head reads, so the head's own layers (BERT's pooler dense + tanh, RoBERTa's dense + tanh + projection) run
on the mean and checkpoints keep their parameter names. It works the same with the speed tricks of
gemcut/models/fast/ on or off (`train.fast`): the padding-free encoder hands the hook every real token of
the last layer, and the first-token trick, which computes the last layer at position 0 alone, is only
installed on a model that does not pool by mean (the hook refuses an output of the wrong length rather
than average one token).

`prepare_classifier` is the one place the pooling is chosen; `load_base`, `load_run` and `gemcut serve`
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

from gemcut.errors import ConfigError, GemcutError

log = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]
CONFIG_FIELD = "classifier_pooling"
# Heads that read only position 0 of the last hidden state (checked against transformers 5's modeling code).
FIRST_TOKEN_HEADS = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "ElectraForSequenceClassification",
)
# Attention implementations whose encoder mask `key_padding` reads (flex attention's block mask is opaque).
MASK_READABLE = ("sdpa", "eager")
# Set on the encoder by `prepare_classifier`, read through `classifier_pooling` (a deepcopy keeps it, with the hook).
_INSTALLED = "gemcut_pooling"


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


def first_token_classifier(model: torch.nn.Module) -> torch.nn.Module | None:
    """The classifier of FIRST_TOKEN_HEADS inside `model` (itself, or the model a peft / DDP wrapper holds);
    None when there is none."""
    return next((m for m in model.modules() if type(m).__name__ in FIRST_TOKEN_HEADS), None)


def classifier_encoder(classifier: torch.nn.Module) -> torch.nn.Module | None:
    """The encoder (the module with the `layer` list) of a first-token classifier; None when it has none."""
    encoder = getattr(getattr(classifier, classifier.base_model_prefix, None), "encoder", None)
    return encoder if getattr(encoder, "layer", None) is not None else None


def key_padding(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None | bool:
    """The [batch, length] bool key mask (True = real) behind transformers' 4-D bidirectional mask;
    None when nothing is masked; False when the mask is something else (per-query rows differ)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-1] != length:
        return False
    if attention_mask.shape[-2] > 1 and not torch.equal(attention_mask, attention_mask[..., :1, :].expand_as(attention_mask)):
        return False
    row = attention_mask[:, 0, 0, :]
    keep = row if row.dtype == torch.bool else row == 0  # a float mask adds 0 where a key is kept
    return keep.expand(batch, length)  # a mask broadcast over the batch has one row


def masked_mean(hidden: torch.Tensor, keep: torch.Tensor | None | bool) -> torch.Tensor:
    """[batch, length, d] -> [batch, d]: each row's mean over its real tokens (`keep`: [batch, length] bool,
    e.g. from `key_padding`; None: every token is real)."""
    if keep is None:
        return hidden.mean(1)
    if keep is False:
        raise GemcutError("mean pooling needs a key-padding attention mask (1 = token, 0 = padding), "
                          "not a per-query mask; pass the tokenizer's attention_mask or use model.pooling=cls")
    weights = keep.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def _mean_at_first_position(encoder: torch.nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of a mean-pooled encoder: its `last_hidden_state` becomes [batch, 1, d], each row's mean
    over its real tokens, where the head reads the first token."""
    inputs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
    hidden = output[0]
    batch, length = inputs.shape[:2]
    if hidden.shape[1] != length:
        raise GemcutError(f"{type(encoder).__name__} returned {hidden.shape[1]} positions of {length}: its last layer was "
                          "made to compute the first token alone (gemcut/models/fast/first_token.py), so it cannot pool "
                          "by mean; choose the pooling (prepare_classifier) before applying the fast tricks (apply_fast)")
    output.last_hidden_state = masked_mean(hidden, key_padding(mask, batch, length)).unsqueeze(1)
    return output


def prepare_classifier(model: torch.nn.Module, setting: str = "auto", source: str | Path | None = None) -> Pooling | None:
    """Choose and install the token reading of an encoder classifier; returns the pooling used, None when
    `model` is not a first-token classifier (it is then left as it was and pools its own way).

    `setting` is `model.pooling` (auto, cls, mean); `source` the folder the weights came from (for auto).
    The choice is written to `model.config.classifier_pooling`, so every folder the model is saved to
    pools the same way when gemcut loads it again. A model keeps the pooling it was given first."""
    if setting not in ("auto", "cls", "mean"):
        raise ConfigError(f"model.pooling={setting!r}: choose auto, cls or mean")
    classifier = first_token_classifier(model)
    encoder = classifier_encoder(classifier) if classifier is not None else None
    attention = getattr(getattr(classifier or model, "config", None), "_attn_implementation", None)
    if encoder is None:
        if setting == "mean":
            raise ConfigError(f"model.pooling=mean: {type(model).__name__} is not a classifier gemcut can mean-pool "
                              "(BERT, RoBERTa, XLM-R or ELECTRA heads); use model.pooling=auto")
        return None
    pooling: Pooling = setting if setting != "auto" else (checkpoint_pooling(classifier, source) or "cls")
    installed = getattr(encoder, _INSTALLED, None)
    if installed is not None and installed != pooling:
        raise ConfigError(f"this {type(classifier).__name__} already pools by {installed}; load it again for {pooling}")
    if pooling == "mean" and attention not in MASK_READABLE:
        raise ConfigError(f"model.pooling=mean: {type(classifier).__name__} with {attention} attention hands its encoder a "
                          f"mask gemcut cannot read; use model.attn_implementation=sdpa (or eager), or model.pooling=cls")
    if installed is None:
        if pooling == "mean":
            encoder.register_forward_hook(_mean_at_first_position, with_kwargs=True)
        setattr(encoder, _INSTALLED, pooling)
    setattr(classifier.config, CONFIG_FIELD, pooling)
    log.debug("%s pools by %s", type(classifier).__name__, "the mean of its tokens" if pooling == "mean" else "its first token")
    return pooling


def classifier_pooling(model: torch.nn.Module) -> Pooling | None:
    """The pooling `prepare_classifier` installed on `model` (or on the model inside a peft / DDP wrapper, or
    on the encoder `model` is); None when none was installed."""
    for module in model.modules():
        pooling = getattr(module, _INSTALLED, None)
        if pooling is not None:
            return pooling
    return None
