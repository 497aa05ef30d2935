"""The numerics that training, evaluation, generation and serving share, written once.

    python -m pytest -q tests/test_numerics.py

- `token_nll(logits, targets)`: -log p(target) per position in fp32, 0 where the target is IGNORE (-100,
  `gemcut.data.collate.IGNORE`). The one formula of every language-model loss and perplexity: the SFT
  objective, evaluation's `sequence_nll`, generation's answer NLL. `token_logps` is its negation (DPO, RL).
- `sequence_logps(model, input_ids, labels)`: the summed log-probability of each row's labelled tokens, the
  shift done here (position t predicts labels[t+1]).
- `classifier_logits(model, tokenizer, rows)`: a sequence classifier's fp32 logits over rows of token ids,
  right-padded in batches (encoders and last-token classifiers both read right-padded rows).
- `unwrap_peft(model)`: the transformers model under a peft wrapper.

Why one module: each of these was written in three or four places and they must agree; evaluation's loss
is only comparable to training's `val_loss` when both are the same formula over the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gemcut.data.collate import IGNORE


def unwrap_peft(model):
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def device_of(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position: logits [..., V] predict targets [...] (already shifted); IGNORE gives 0.

    The softmax runs in fp32 whatever the logits' dtype: bf16 log-probabilities over a large vocabulary lose
    the small differences the loss is made of."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="none")
    return flat.view(targets.shape)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) per position: logits [B,T,V] predict targets [B,T] (already shifted); -100 gives 0."""
    return -token_nll(logits, targets)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B] summed log-probability of the labelled tokens (labels aligned with input_ids, IGNORE elsewhere)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_logps(logits[:, :-1], labels[:, 1:]).sum(-1)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [N, T] of token-id rows padded on the right with `pad_id`.

    An empty row still gets one (pad) position with mask 1, so a classifier has a token to read."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    mask[:, 0] = 1
    return ids, mask


@torch.no_grad()
def classifier_logits(model, tokenizer, rows: Sequence[Sequence[int]], *, batch_size: int = 16,
                      progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """[N, C] fp32 logits of a sequence classifier over token-id rows, on the model's device.

    Rows run in batches of `batch_size`, right-padded with the tokenizer's pad id (0 without one);
    `progress(n)` is called after each batch with its row count."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = device_of(model)
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask = right_pad(rows[start:start + batch_size], pad)
        out.append(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float())
        if progress:
            progress(ids.shape[0])
    return torch.cat(out) if out else torch.zeros((0, 1), device=device)
