"""Constrained label likelihood: a causal LM's answer to a label question is the label it finds most likely.

    python -m pytest -q tests/test_eval_baselines.py

A base model asked "negative, neutral or positive?" often answers in a way no rule maps to a label ("The
tweet expresses..."), so scoring its free text says more about its format than about what it knows. Here the
model never writes: each label is appended to the prompt as the assistant's answer, rendered by the run's chat
template, and the label's score is the summed log-probability of the label's tokens after the prompt (up to
the template's end-of-turn token), in fp32 as `gemcut.models.numerics.token_nll` computes it. The prediction
is the argmax over labels, so every answer is a label by construction (Brown et al. 2020, "Language Models
are Few-Shot Learners", section 2.4, the multiple-choice scoring of https://arxiv.org/abs/2005.14165).

Cost: the labels' first tokens come from one batched pass over the prompts (one distribution at each prompt's
last token gives every label's first token at once); only labels of several tokens add rows for their later
tokens. The rows of a batch share the chat header, the instruction and any few-shot examples, which run once
per batch (gemcut/models/shared_prefix.py). So the zero-shot baseline costs about one prompt pass, less than
generating an answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch

from gemcut.errors import GemcutError
from gemcut.eval import scoring
from gemcut.eval.examples import Example
from gemcut.eval.task_scoring import reference_targets
from gemcut.generation import accepts_logits_to_keep
from gemcut.models.kv_cache import cache_argument
from gemcut.models.numerics import device_of, right_pad
from gemcut.models.shared_prefix import prefix_cache, prefix_to_share, suffix_positions

# Prompts are scored whole: a few-shot prompt is longer than data.max_length, which bounds training rows only.
NO_TRUNCATION = 1 << 30


def names_every_label(text: str, labels: list[str]) -> bool:
    """Whether each label occurs in `text` as a whole word (ignoring case)."""
    lowered = text.lower()
    return all(re.search(r"(?<![\w])" + re.escape(lab.lower()) + r"(?![\w])", lowered) for lab in labels)


def with_label_set(prompt: list[dict], labels: list[str]) -> list[dict]:
    """The prompt with the label set named in its last user turn: unchanged when that turn names every label
    already (the quickstart's instruction does), else "Answer with one of: a, b, c." appended to it."""
    last = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
    if last is None or names_every_label(prompt[last]["content"], labels):
        return prompt
    turn = {**prompt[last], "content": f"{prompt[last]['content']}\n\nAnswer with one of: {', '.join(labels)}."}
    return [*prompt[:last], turn, *prompt[last + 1:]]


def label_tokens(tokenizer, template, prompt: list[dict], labels: list[str]) -> list[list[int]]:
    """Each label's answer tokens as the template renders them after `prompt` (up to its end-of-turn token)."""
    stops = set(getattr(template, "stop_token_ids", []) or [])
    example = Example(source="", kind="label", prompt=prompt, reference="")
    prompt_ids = list(template.prompt_ids(prompt))
    out = []
    for label in labels:
        ids, targets = reference_targets(example, tokenizer, template, NO_TRUNCATION, response=label)
        if list(ids[:len(prompt_ids)]) != prompt_ids:
            raise GemcutError(f"the chat template renders the prompt differently once the answer {label!r} follows it, so "
                              "a label's tokens after the prompt are not defined; set data.template (e.g. chatml)")
        tokens = []
        for token, is_target in zip(ids, targets):
            if is_target and token in stops:
                break
            if is_target:
                tokens.append(token)
        out.append(tokens or [t for t, is_target in zip(ids, targets) if is_target][:1])
    return out


@torch.no_grad()
def next_token_logprobs(model, rows: list[list[int]], candidates: list[int], *, batch_size: int = 16,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """[N, C] log-probability of each candidate token right after each row of token ids (fp32 softmax).

    One forward pass per batch; the vocabulary head runs only at each row's last token, and the prefix every
    row of a batch shares runs once (gemcut/models/shared_prefix.py), as in `scoring.sequence_nll`."""
    model.eval()
    device = device_of(model)
    head_on_last = accepts_logits_to_keep(model)
    out = np.zeros((len(rows), len(candidates)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    wanted = torch.tensor(candidates, dtype=torch.long, device=device)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        input_ids, mask = right_pad([rows[i] for i in chosen], 0)
        input_ids, mask = input_ids.to(device), mask.to(device)
        last = torch.tensor([len(rows[i]) - 1 for i in chosen], device=device)
        predicting = torch.zeros_like(input_ids, dtype=torch.bool)
        predicting[torch.arange(len(chosen), device=device), last] = True
        shared = prefix_to_share(input_ids, mask, predicting)
        if head_on_last and shared:
            cache = prefix_cache(model, input_ids[:1, :shared], len(chosen), logits_to_keep=1)
            logits = model(input_ids=input_ids[:, shared:], attention_mask=mask, position_ids=suffix_positions(mask, shared),
                           use_cache=True, logits_to_keep=predicting[:, shared:], **{cache_argument(model): cache}).logits
            logits = logits.reshape(-1, logits.shape[-1])
        elif head_on_last:
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=predicting).logits
            logits = logits.reshape(-1, logits.shape[-1])
        else:
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[predicting]
        logp = torch.log_softmax(logits.float(), dim=-1)[:, wanted]
        out[chosen] = logp.cpu().numpy()
        if progress:
            progress(len(chosen))
    return out


def label_logprobs(model, tokenizer, template, prompts: list[list[dict]], labels: list[str], *, batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """[N, L] summed log-probability of each label's tokens after each prompt conversation.

    The labels' first tokens are read from one pass over the prompts (`next_token_logprobs`); only labels of
    several tokens add a row each for their later tokens (`scoring.sequence_nll`). The label tokens are those of
    the first prompt's rendering (a chat template's answer starts after a fixed header, so they are the same
    after every prompt). `progress(n)` advances by prompts, N in all."""
    if not prompts:
        return np.zeros((0, len(labels)))
    tokens = label_tokens(tokenizer, template, prompts[0], labels)
    prompt_ids = [list(template.prompt_ids(p)) for p in prompts]
    firsts = sorted({t[0] for t in tokens})
    first = next_token_logprobs(model, prompt_ids, firsts, batch_size=batch_size, progress=progress)
    scores = np.stack([first[:, firsts.index(t[0])] for t in tokens], axis=1)
    longer = [j for j, t in enumerate(tokens) if len(t) > 1]
    if longer:
        rows = [(i, j) for i in range(len(prompts)) for j in longer]
        ids = [prompt_ids[i] + tokens[j] for i, j in rows]
        targets = [[False] * (len(prompt_ids[i]) + 1) + [True] * (len(tokens[j]) - 1) for i, j in rows]
        rest = scoring.sequence_nll(model, ids, targets, batch_size=batch_size)
        for (i, j), (nll, _) in zip(rows, rest):
            scores[i, j] -= nll
    return scores


def constrained_labels(model, tokenizer, template, prompts: list[list[dict]], labels: list[str], *, batch_size: int = 16,
                       progress: Callable[[int], None] | None = None) -> tuple[list[str], np.ndarray]:
    """(the most likely label of each prompt, the [N, L] log-probabilities it was chosen from). Ties go to the
    first label in `labels`; no answer is ever unparseable."""
    scores = label_logprobs(model, tokenizer, template, prompts, labels, batch_size=batch_size, progress=progress)
    return [labels[int(i)] for i in scores.argmax(axis=1)], scores
