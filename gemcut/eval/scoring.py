"""Run one model over evaluation records and return per-example results (no metrics, no files).

    python -m pytest -q tests/test_eval_scoring.py

`task_scoring.score_model` calls these once for the tuned model and once for the base model; evaluate.py
then turns the per-example results into metrics and bootstrap intervals. Each function takes plain inputs
(token ids, texts, message lists), so the same code scores any model; the formulas themselves (token NLL,
the padded classifier forward) are gemcut/models/numerics.py's, the ones training uses:

- `predict_classes`: argmax of a sequence classifier's logits -> class index per text (and its loss).
- `generate_texts`: the next assistant turn for each prompt conversation (via `gemcut.generation`).
- `sequence_nll`: summed negative log-likelihood and token count of each sequence's target tokens, the
  training objective's formula per sequence, so evaluation and training measure loss the same way.
- `reward_scores`: the scalar output of a reward model (a one-logit sequence classifier) per text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gemcut.generation import GenerationResult, accepts_logits_to_keep, generate
from gemcut.models.kv_cache import cache_argument
from gemcut.models.numerics import classifier_logits, device_of, right_pad, token_nll
from gemcut.models.shared_prefix import prefix_cache, prefix_to_share, suffix_positions


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


@torch.no_grad()
def predict_classes(model, tokenizer, input_ids: Sequence[Sequence[int]], true_index: Sequence[int] | None = None, *,
                    batch_size: int = 16, progress: Callable[[int], None] | None = None) -> tuple[list[int], list[tuple[float, int]]]:
    """Class index (argmax of logits) for each tokenized text, and its cross-entropy against `true_index`.

    The loss is returned as (NLL, 1) per example, the shape `sequence_nll` uses, so the mean over a split
    is the classifier's validation loss (unweighted cross-entropy, fp32 softmax as in training).
    """
    model.eval()
    logits = classifier_logits(model, tokenizer, input_ids, batch_size=batch_size, progress=progress)
    preds = [int(x) for x in logits.argmax(dim=-1).tolist()]
    nll: list[tuple[float, int]] = []
    if true_index is not None:
        target = torch.tensor(list(true_index), dtype=torch.long, device=logits.device)
        nll = [(float(x), 1) for x in F.cross_entropy(logits, target, reduction="none").tolist()]
    return preds, nll


@torch.no_grad()
def reward_scores(model, tokenizer, input_ids: Sequence[Sequence[int]], *, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> list[float]:
    """The first logit of a sequence classifier for each tokenized text (a reward model has exactly one)."""
    model.eval()
    logits = classifier_logits(model, tokenizer, input_ids, batch_size=batch_size, progress=progress)
    return [float(x) for x in logits[:, 0].tolist()]


def generate_texts(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = 0, batch_size: int = 16, stop: list[str] | None = None,
                   eos_ids=None, answers: Sequence[tuple[list[int], list[bool]]] | None = None,
                   progress: Callable[[int], None] | None = None) -> list[GenerationResult]:
    """Generate for every prompt in batches of `batch_size`, reporting progress after each batch.

    Prompts are batched by length (left padding is computed and thrown away) and the results returned in the
    prompts' order; with sampling, the batches and so the texts depend only on the prompts and `seed`.
    `answers` (see `gemcut.generation.generate`) fills each result's `answer_nll`."""
    by_length = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[GenerationResult | None] = [None] * len(prompt_ids)
    for rows in _batches(len(prompt_ids), batch_size):
        # One seed per batch start keeps a sampled evaluation reproducible whatever the number of batches.
        batch_seed = None if seed is None else seed + rows.start
        chosen = [by_length[r] for r in rows]
        outs = generate(model, tokenizer, [list(prompt_ids[i]) for i in chosen], max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=batch_seed, stop=stop, eos_ids=eos_ids,
                        answers=None if answers is None else [answers[i] for i in chosen])
        for i, out in zip(chosen, outs):
            results[i] = out
        if progress:
            progress(len(rows))
    return results


@torch.no_grad()
def sequence_nll(model, ids: Sequence[Sequence[int]], targets: Sequence[Sequence[bool]], *, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
    """(summed NLL, token count) of the tokens of ids[i] where targets[i] is True, given what precedes them.

    The formula of the training objective (`gemcut.objectives.causal_lm`: shifted cross-entropy in fp32
    over the target tokens), kept per sequence. Sequences are batched by similar length and right-padded,
    so padding never precedes a real token; the tests check that the result equals the objective run on
    each sequence alone. The first token is never a target; a sequence without targets gives (0.0, 0).
    """
    model.eval()
    device = device_of(model)
    head_on_targets = accepts_logits_to_keep(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(ids)
    todo = [i for i in range(len(ids)) if len(ids[i]) >= 2 and any(targets[i][1:])]
    todo.sort(key=lambda i: len(ids[i]))  # similar lengths together: little padding
    for start in range(0, len(todo), batch_size):
        rows = todo[start:start + batch_size]
        input_ids, mask = right_pad([ids[i] for i in rows], 0)
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        for r, i in enumerate(rows):
            keep[r, : len(ids[i])] = torch.tensor(list(targets[i]), dtype=torch.bool)
        input_ids, mask, keep = input_ids.to(device), mask.to(device), keep.to(device)
        shifted = keep[:, 1:]  # [B, T-1]: position t predicts token t+1
        if head_on_targets:
            # The vocabulary head runs only where a target is predicted (a prompt of 70 tokens, an answer of 3).
            predicting = torch.cat([shifted, torch.zeros_like(shifted[:, :1])], dim=1)
            shared = prefix_to_share(input_ids, mask, predicting)
            if shared:  # the prompt prefix all rows share runs once (gemcut/models/shared_prefix.py)
                cache = prefix_cache(model, input_ids[:1, :shared], len(rows), logits_to_keep=1)
                logits = model(input_ids=input_ids[:, shared:], attention_mask=mask, position_ids=suffix_positions(mask, shared),
                               use_cache=True, logits_to_keep=predicting[:, shared:], **{cache_argument(model): cache}).logits
            else:
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=predicting).logits
            logits = logits.reshape(-1, logits.shape[-1])
        else:
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1][shifted]
        nll = token_nll(logits, input_ids[:, 1:][shifted])
        row_of = torch.nonzero(shifted)[:, 0]
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, nll.double())
        counts = shifted.sum(dim=1)
        for r, i in enumerate(rows):
            out[i] = (float(sums[r]), int(counts[r]))
        if progress:
            progress(len(rows))
    if progress and len(todo) < len(ids):
        progress(len(ids) - len(todo))
    return out
