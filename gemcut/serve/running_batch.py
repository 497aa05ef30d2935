"""The sequences decoding together on one served model, one token each per step (continuous batching).

    python -m pytest -q tests/test_serve_batching.py
    batch = RunningBatch(served)
    events = batch.join([(prompt_ids, rows), ...])   # prompts prefilled, each row's first token picked
    events = batch.step()                            # one more token for every row; finished rows have left

The worker (gemcut/serve/worker.py) calls `join` with the requests that arrived while others decode, so
they decode with them from the next step on, and `step` in a loop. Rows share one KV cache, padded on the
left (gemcut/models/kv_cache.py):
- the prompts joining together run in one forward pass (their own suffixes left-padded after the prefix
  they share; a request's cache row repeated for its n choices), and their rows are joined to the running
  ones by padding the shorter side with masked zero columns on the left;
- every row keeps its own position ids (its real tokens counted), so its logits are those it would get
  alone: batched greedy output equals one-by-one output, log-probabilities within 1e-5
  (tests/test_serve_batching.py, with requests arriving mid-batch);
- a finished row leaves at once (its cache rows dropped), and columns only padding occupies are cut;
- each row picks its token with its own `TokenPicker` (its request's sampling settings, a generator seeded
  `seed + choice`), greedy rows with one argmax for all of them.

Prefix sharing: the tokens a prompt shares with the one before it, or with all the prompts arriving with
it (the chat template's header and system prompt; 8 tokens at least, MIN_SHARED_TOKENS), run once and are
kept; later prompts that start with them run only their own suffix on a copy of that cache. One prefix is
kept per served model; a prompt that shares only part of it cuts it back (no forward pass).

A model whose cache cannot be joined (sliding-window layers) decodes the requests that start together as
one batch, but a request that arrives while they decode waits until they have finished (`accepts_more`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gemcut.generation import Completion, StreamDelta, TokenLogprob, TokenPicker, accepts_logits_to_keep
from gemcut.models.kv_cache import (
    cache_argument,
    copy_of,
    drop_leading_columns,
    join_rows,
    keep_rows,
    returned_cache,
    rows_joinable,
)
from gemcut.models.numerics import device_of
from gemcut.models.shared_prefix import MIN_SHARED_TOKENS, prefix_cache, shared_prompt_length, suffix_positions

Event = tuple["Row", list[StreamDelta]]  # a row and the stream deltas its new token released


@dataclass
class Row:
    """One choice of one request: how it picks (`picker`, one row), what it has produced (`completion`), the
    id it feeds next and that id's position."""

    owner: Any  # the request this row answers (the worker's GenJob)
    choice: int
    picker: TokenPicker
    completion: Completion
    token: int = 0
    position: int = 0
    last_token_at: float = 0.0  # perf_counter of its latest token (inter-token latency)


def _left_padded(mask: torch.Tensor, columns: int) -> torch.Tensor:
    if columns <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], columns)), mask], dim=-1)


class RunningBatch:
    """The rows decoding on `served` (a ServedModel: its `model` computes under `served.activate()`, which
    the caller enters around `join` and `step`)."""

    def __init__(self, served):
        self.served = served
        self.model = served.model
        self.device = device_of(self.model)
        self.cache_name = cache_argument(self.model)
        self.keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, cache columns + 1 per step], 0 on padding
        # Whether the model's cache is plain growing layers (kv_cache.rows_joinable), learnt from its first prompt;
        # rows join, and prefixes are shared, only then.
        self.joinable: bool | None = None
        self.prefix: tuple[list[int], Any] | None = None  # (ids, their batch-1 cache)
        self.last_prompt: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def accepts_more(self) -> bool:
        """Whether a new request may join now."""
        return not self.rows or bool(self.joinable)

    # ------------------------------------------------------------------ prompts

    def _shared_prefix(self, prompt: list[int], others: list[list[int]]) -> tuple[int, Any]:
        """(tokens at the start of `prompt` whose cache is known, a copy of that cache) or (0, None). The kept
        prefix, cut back to what `prompt` shares with it; else a new one, what `prompt` shares with the prompt
        before it, or with all of `others` (prompts arriving with it)."""
        previous, self.last_prompt = self.last_prompt, list(prompt)
        if not self.joinable:  # unknown yet, or layers a copy would not keep (sliding windows)
            return 0, None
        if self.prefix is not None:
            ids, cache = self.prefix
            common = shared_prompt_length([ids + [-1], prompt])  # at most len(ids), and a token of the prompt left
            if common == len(ids):
                return common, copy_of(cache)
            if common >= MIN_SHARED_TOKENS:  # a shorter part of it is shared: cut it back, no forward pass
                cache.crop(common - len(ids))
                self.prefix = (ids[:common], cache)
                return common, copy_of(cache)
        common = max(shared_prompt_length([prompt, *others]) if others else 0, shared_prompt_length([previous, prompt]) if previous else 0)
        if common < MIN_SHARED_TOKENS:
            return 0, None
        ids = list(prompt[:common])
        cache = prefix_cache(self.model, torch.tensor([ids], device=self.device), 1, **self.keep_last)
        self.prefix = (ids, cache)
        return common, copy_of(cache)

    def _prefill(self, prompts: list[list[int]], start: int, cache) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Logits [k, V] at the last position of each prompt, their cache and its mask [k, columns], in one
        forward pass: the prompts' suffixes left-padded after their first `start` tokens, whose cache (one
        row) is `cache`; each row's positions count its real tokens."""
        suffixes = [p[start:] for p in prompts]
        width = max(map(len, suffixes))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), start + width), dtype=torch.long)
        mask[:, :start] = 1
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
            mask[i, start + width - len(suffix):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if cache is not None and len(prompts) > 1:
            cache.batch_repeat_interleave(len(prompts))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=suffix_positions(mask, start), use_cache=True,
                         **{self.cache_name: cache}, **self.keep_last)
        cache = returned_cache(out)
        if cache is None:
            raise RuntimeError(f"{type(self.model).__name__} returned no KV cache; the running batch needs one")
        if self.joinable is None:
            self.joinable = rows_joinable(cache)
        return out.logits[:, -1, :], cache, mask

    def join(self, requests: list[tuple[list[int], list[Row]]]) -> list[Event]:
        """Prefill each request's prompt for its rows (its choices) and pick each row's first token; the rows
        not finished by it decode with the others from the next `step`. The prompts that start with the
        same shared prefix run in one forward pass on its cache; any others in another."""
        events: list[Event] = []
        while requests:
            first = requests[0][0]
            start, cache = self._shared_prefix(first, [prompt for prompt, _ in requests[1:]])
            together = [r for r in requests if len(r[0]) > start and r[0][:start] == first[:start]]
            requests = [r for r in requests if all(r is not t for t in together)]
            events += self._join_together(together, start, cache)
        return events

    def _join_together(self, requests: list[tuple[list[int], list[Row]]], start: int, cache) -> list[Event]:
        logits, cache, mask = self._prefill([prompt for prompt, _ in requests], start, cache)
        rows = [row for _, request_rows in requests for row in request_rows]
        source = [i for i, (_, request_rows) in enumerate(requests) for _ in request_rows]  # each row's prompt
        events = self._pick(rows, logits[source])
        for (prompt, request_rows) in requests:
            for row in request_rows:
                row.position = len(prompt)
        staying = [j for j, row in enumerate(rows) if not row.completion.finished]
        if not staying:
            return events
        keep = [source[j] for j in staying]  # a prompt's cache row, repeated for each of its staying choices
        if keep != list(range(len(requests))):
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
        mask = mask[keep]
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            added = join_rows(self.cache, cache)
            self.mask = torch.cat([_left_padded(self.mask, added), _left_padded(mask, self.mask.shape[1] - mask.shape[1])])
        self.rows += [rows[j] for j in staying]
        return events

    # ------------------------------------------------------------------ decoding

    def step(self) -> list[Event]:
        """Feed every row its last token, pick the next one; finished rows leave."""
        ids = torch.tensor([[row.token] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=-1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self.cache_name: self.cache})
        self.cache = returned_cache(out)
        for row in self.rows:
            row.position += 1
        events = self._pick(self.rows, out.logits[:, -1, :])
        self.leave(lambda row: row.completion.finished)
        return events

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[Event]:
        picked: list[int] = [0] * len(rows)
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        greedy = [i for i, row in enumerate(rows) if row.picker.plain_greedy]
        if greedy:  # one argmax for every plain greedy row (what TokenPicker computes for each)
            for i, token_id in zip(greedy, logits[greedy].float().argmax(dim=-1).tolist()):
                picked[i] = token_id
        for i, row in enumerate(rows):
            if not row.picker.plain_greedy:
                ids, lps = row.picker(logits[i:i + 1])
                picked[i], logprobs[i] = int(ids[0]), None if lps is None else lps[0]
        events = []
        for i, row in enumerate(rows):
            row.token = picked[i]
            events.append((row, row.completion.add(picked[i], logprobs[i], row.picker.constraint_done(0))))
        return events

    def leave(self, gone: Callable[[Row], bool]) -> list[Row]:
        """Remove the rows for which `gone(row)` holds (finished, or their client went away); returns them."""
        keep = [i for i, row in enumerate(self.rows) if not gone(row)]
        if len(keep) == len(self.rows):
            return []
        left = [row for i, row in enumerate(self.rows) if i not in set(keep)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return left
        if self.joinable:
            keep_rows(self.cache, keep)
        else:
            self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self.mask = self.mask[keep]
        leading = int(torch.nonzero(self.mask.any(dim=0))[0, 0])  # columns that are padding in every row left
        if self.joinable and leading:
            drop_leading_columns(self.cache, leading)
            self.mask = self.mask[:, leading:]
        return left
