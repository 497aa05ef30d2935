"""Next-token cross-entropy: the objective of continued pretraining and of supervised fine-tuning.

    python -m pytest -q tests/test_objectives.py

The autoregressive language-modelling loss of Radford et al., "Improving Language Understanding by
Generative Pre-Training" (2018), eq. 1 — maximise sum_t log P(x_t | x_<t) — applied as in Ouyang et al.,
"Training language models to follow instructions with human feedback" (2022) for SFT: only the tokens whose
label is not -100 (the completion / assistant tokens when the data layer masks the prompt) contribute.

Batch (see docs/architecture.md): `input_ids` [B,T], `labels` [B,T] aligned with `input_ids` (this module
does the shift: position t predicts labels[t+1]), `attention_mask` [B,T], optional `position_ids` [B,T]
(packed documents), optional `loss_weight` [B,T] float, a per-token multiplier of the loss (per-message
`weight` in `messages` records). Tokens with weight 0 are not targets and are not counted.

Metric `mean_token_accuracy` (logged by the loop for each step, `val_mean_token_accuracy` by validation): the
number of targets whose argmax prediction is the label, a sum that the loop divides by the step's targets as
it does the loss, so it is the fraction of the step's trained tokens predicted right (the figure OpenAI's
fine-tuning metrics call train/valid_mean_token_accuracy). It is read off the logits the loss uses (in the
chunked head, chunk by chunk), so it costs one argmax and keeps nothing alive.

Speed: for decoder architectures whose logits are exactly `lm_head(last_hidden_state)` the head runs only
on the target positions. With a 49k vocabulary the head is a fifth of SmolLM2-135M's forward cost and its
[B,T,V] fp32 logits the largest activation; prompt and padding tokens need neither. The head and the loss
then run in chunks (chunked_ce.py), so even the target positions' logits never exist all at once. Tokens
that start every row of a batch (an instruction template's prompt) run once for the batch
(gemcut/models/shared_prefix.py); `CausalLM(share_prefix=False)` always runs whole rows.
"""

from __future__ import annotations

import weakref

import torch

from gemcut.data.collate import IGNORE
from gemcut.models.kv_cache import cache_argument
from gemcut.models.numerics import token_nll, unwrap_peft
from gemcut.models.shared_prefix import (
    has_active_dropout,
    prefix_cache,
    prefix_to_share,
    suffix_positions,
    uses_activation_checkpointing,
)
from gemcut.objectives.base import ObjectiveOutput
from gemcut.objectives.chunked_ce import linear_cross_entropy_and_hits

# Architectures whose causal-LM forward is `lm_head(decoder(...).last_hidden_state)` with nothing between
# (no logit soft-capping or scaling), so computing the head on a subset of positions is exact.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"})
TOKEN_ACCURACY = "mean_token_accuracy"


def _target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1] bool: which shifted positions are trained."""
    mask = batch["labels"][:, 1:] != IGNORE
    weight = batch.get("loss_weight")
    if weight is not None:
        mask = mask & (weight[:, 1:] > 0)
    return mask


def packed_as_one_row(model: torch.nn.Module, inputs: dict[str, torch.Tensor], forward) -> torch.Tensor:
    """`forward(inputs)`, with packed rows under flash attention run as one row of B x T tokens.

    transformers' flash-attention path keeps packed documents apart (variable-length kernels from the position
    ids) only for a batch of one row; with more, the documents of a row attend to each other. Every packed row
    starts a document at position 0, so one long row of them computes exactly what the rows would alone."""
    config = getattr(unwrap_peft(model), "config", None)
    flash = getattr(config, "_attn_implementation", None) == "flash_attention_2"
    if not flash or "position_ids" not in inputs or "attention_mask" in inputs or inputs["input_ids"].shape[0] == 1:
        return forward(inputs)
    rows, width = inputs["input_ids"].shape
    out = forward({k: v.reshape(1, -1) for k, v in inputs.items()})
    return out.view(rows, width, *out.shape[2:])


def _decoder_and_head(model: torch.nn.Module):
    """(decoder, lm_head) when the head can run on selected positions only; None otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, FSDPModule)):
        return None  # DDP's gradient hooks and FSDP2's parameter gathering need the wrapped forward to run
    inner = unwrap_peft(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    if not hasattr(inner, "get_decoder") or not hasattr(inner, "get_output_embeddings"):
        return None
    return inner.get_decoder(), inner.get_output_embeddings()


class CausalLM:
    """Shifted token cross-entropy, summed over target tokens (optionally weighted per token)."""

    task = "causal_lm"
    share_prefix = True  # a class default too, so a subclass that skips __init__ keeps it
    logged = (TOKEN_ACCURACY,)  # step metrics the loop logs (gemcut/train/loop.py: backward_step)

    def __init__(self, share_prefix: bool = True):
        self.share_prefix = share_prefix

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(_target_mask(batch).sum())

    def _shared_prefix(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> int:
        """Leading columns to run once for the whole batch: the common real prefix, cut before the first target."""
        if not self.share_prefix or "attention_mask" not in inputs or "position_ids" in inputs:
            return 0  # packed rows carry their own positions and restart documents mid-row
        by_model = self.__dict__.setdefault("_prefix_allowed", weakref.WeakKeyDictionary())  # model -> {training: allowed}
        allowed = by_model.setdefault(model, {})
        if model.training not in allowed:  # a model's dropout and checkpointing do not change between steps
            allowed[model.training] = not (has_active_dropout(model) or uses_activation_checkpointing(model))
        if not allowed[model.training]:
            return 0
        return prefix_to_share(inputs["input_ids"], inputs["attention_mask"], mask)  # mask: columns predicting a target

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        mask = _target_mask(batch)
        targets = batch["labels"][:, 1:][mask]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weight")}
        weight = batch.get("loss_weight")
        token_weight = weight[:, 1:][mask] if weight is not None else None
        split = _decoder_and_head(model)
        if split is not None:
            decoder, head = split
            shared = self._shared_prefix(model, inputs, mask)
            if shared:
                # The prompt prefix every row shares runs once (gemcut/models/shared_prefix.py); rows run the rest.
                cache = prefix_cache(decoder, inputs["input_ids"][:1, :shared], inputs["input_ids"].shape[0])
                out = decoder(input_ids=inputs["input_ids"][:, shared:], attention_mask=inputs["attention_mask"],
                              position_ids=suffix_positions(inputs["attention_mask"], shared), use_cache=True,
                              **{cache_argument(decoder): cache})
                hidden = out.last_hidden_state[:, :-1][mask[:, shared:]]
            else:
                hidden = packed_as_one_row(decoder, inputs, lambda x: decoder(**x, use_cache=False).last_hidden_state)[:, :-1][mask]
            if type(head) is torch.nn.Linear and head.bias is None:  # a plain head (not adapted): never hold all logits
                loss_sum, hits = linear_cross_entropy_and_hits(hidden, head.weight, targets, token_weight)
                return ObjectiveOutput(loss_sum, int(targets.numel()), {TOKEN_ACCURACY: hits})
            logits = head(hidden)
        else:
            logits = packed_as_one_row(model, inputs, lambda x: model(**x, use_cache=False).logits)[:, :-1][mask]
        token_loss = token_nll(logits, targets)  # fp32 softmax
        if token_weight is not None:
            token_loss = token_loss * token_weight.to(token_loss.dtype)
        hits = (logits.detach().argmax(dim=-1) == targets).sum()
        return ObjectiveOutput(token_loss.sum(), int(targets.numel()), {TOKEN_ACCURACY: hits})
