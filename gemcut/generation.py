"""Text generation: the one place sampling lives (eval, serve and RL rollouts all call `generate`).

    from gemcut.generation import generate
    results = generate(model, tokenizer, [ids_a, ids_b], max_new_tokens=32)          # greedy
    results = generate(model, tokenizer, prompts, max_new_tokens=32, temperature=0.8, top_p=0.9, seed=1)

A batch of prompts is left-padded so that every row's next token is produced at the same column; position
ids restart at 0 at each row's first real token, so a padded row computes what it would compute alone (the
test checks that batched greedy output equals one-by-one greedy output). Decoding keeps a KV cache and
feeds one token per step. `temperature == 0` is greedy (argmax, no randomness); otherwise tokens are drawn
from the temperature-scaled, nucleus-truncated distribution with a `torch.Generator` seeded from `seed`, so
the same seed, prompts and batch split give the same text.

Before a token is picked, the last-position logits of each row go through, in this order: `logit_bias`
(added), the OpenAI penalties (`apply_penalties`: `presence_penalty * [count > 0] + frequency_penalty * count`
subtracted, counts of the tokens that row has generated so far), and a row's `constraint` (tokens it
forbids get -inf; see `Constraint`). Every step is per row, so batched output still equals one-by-one
output. With `logprobs=k`, each generated token comes with its log-probability and the k most likely
tokens under the model's own distribution, `log_softmax` of the raw logits, before bias, penalties,
constraint, temperature and top_p (what OpenAI reports), so the numbers do not depend on how one samples.

A row finishes on an end-of-sequence id (`finish_reason="stop"`, the id is not part of the text), on a stop
string (`"stop"`, the text is cut before the stop string), when its constraint admits no further token
(`"stop"`), or after `max_new_tokens` (`"length"`). A row with a constraint may end on an end id only where
the constraint says its output is complete.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gemcut.models.kv_cache import cache_argument, returned_cache
from gemcut.models.numerics import device_of, token_nll, unwrap_peft
from gemcut.models.shared_prefix import MIN_SHARED_TOKENS, prefix_cache, shared_prompt_length, suffix_positions


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (raw logits' log_softmax) and the `top` (id,
    logprob) pairs, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One completion: the decoded text (without the end token or stop string), the generated token ids
    (the end-of-sequence id excluded; for a stop string, the tokens up to the one that completed it), and
    why it ended: "stop" (eos id, stop string, or a finished constraint) or "length" (max_new_tokens reached).
    `logprobs`, with `generate(..., logprobs=k)`, has one entry per token id."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    answer_nll: tuple[float, int] | None = None  # (summed NLL, targets) of a given answer; see `generate`'s `answers`
    logprobs: list[TokenLogprob] | None = None


@dataclass
class StreamDelta:
    """A piece of a streamed completion: new text (may be empty), the id generated in this step (none on a
    final eos delta) with its `logprobs` when asked, and `finish_reason` ("stop" or "length") on the last
    delta only."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class Constraint(Protocol):
    """What a row's output may be (gemcut/serve/structured.py: JSON); one object per row, used once.

    `allowed(vocab_size)` is a bool mask [vocab_size] of the tokens that may come next (end ids aside);
    `complete()` says whether the output so far is whole, so an end id may come now; `done()` that no
    token at all may follow; `advance(token_id)` records the token picked."""

    def allowed(self, vocab_size: int) -> torch.Tensor: ...
    def complete(self) -> bool: ...
    def done(self) -> bool: ...
    def advance(self, token_id: int) -> None: ...


def default_eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's eos plus the model's generation config eos (one id or a list)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, Iterable):
        ids.update(int(e) for e in eos)
    return ids


def _left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Pick one token per row from last-position logits [B, V]; `generator` may be one per row."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # Sampling on the CPU keeps a seeded run identical across devices.
    if isinstance(generator, list):  # a row's draws depend on its own seed only, not on its batch
        probs = probs.cpu()
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).squeeze(-1) for i, g in enumerate(generator)]).to(logits.device)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: `logits - presence * (counts > 0) - frequency * counts`, per row.

    logits [B, V] float; counts [B, V]: how often each token has been generated in that row so far."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


MAX_TOP_LOGPROBS = 20


class TokenPicker:
    """Per-row logits processing and the pick of one batch (the module docstring gives the order).

    Called with each step's last-position logits [B, V]; returns the picked ids [B] and, with `logprobs`,
    one `TokenLogprob` per row. Keeps the rows' token counts (penalties) and advances their constraints."""

    def __init__(self, rows: int, *, temperature: float, top_p: float, generator, eos_ids: set[int], presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
                 constraints: Sequence[Constraint | None] | None = None, logprobs: int | None = None):
        self.rows, self.temperature, self.top_p, self.generator, self.eos_ids = rows, temperature, top_p, generator, eos_ids
        self.presence, self.frequency, self.logit_bias = presence_penalty, frequency_penalty, dict(logit_bias or {})
        self.constraints = list(constraints) if constraints is not None else [None] * rows
        self.logprobs = logprobs
        self.counts: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    @property
    def plain_greedy(self) -> bool:
        """Whether the pick is the argmax of the raw logits: greedy, nothing added, no constraint, no logprobs
        (a caller may then take the argmax of many rows at once)."""
        return (self.temperature == 0 and not self.logit_bias and not self.presence and not self.frequency
                and self.logprobs is None and all(c is None for c in self.constraints))

    def constraint_done(self, row: int) -> bool:
        c = self.constraints[row]
        return c is not None and c.done()

    def _mask(self, vocab: int, device) -> torch.Tensor | None:
        if not any(c is not None for c in self.constraints):
            return None
        mask = torch.ones((self.rows, vocab), dtype=torch.bool)
        eos = [e for e in self.eos_ids if e < vocab]
        for r, c in enumerate(self.constraints):
            if c is None or c.done():
                continue  # a finished row's pick is ignored: leave it free rather than with nothing to pick
            row = c.allowed(vocab).clone()
            row[eos] = c.complete()
            if row.any():
                mask[r] = row
        return mask.to(device)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[TokenLogprob] | None]:
        raw = logits.float()
        x = raw
        if self.logit_bias:
            if self.bias is None:
                self.bias = torch.zeros(raw.shape[-1], dtype=raw.dtype)
                for token_id, value in self.logit_bias.items():
                    self.bias[token_id] += value
                self.bias = self.bias.to(raw.device)
            x = x + self.bias
        if self.presence or self.frequency:
            if self.counts is None:
                self.counts = torch.zeros_like(raw)
            x = apply_penalties(x, self.counts, self.presence, self.frequency)
        mask = self._mask(raw.shape[-1], raw.device)
        if mask is not None:
            x = x.masked_fill(~mask, float("-inf"))
        picked = _next_tokens(x, self.temperature, self.top_p, self.generator)
        if self.counts is not None:
            self.counts[torch.arange(self.rows, device=raw.device), picked] += 1
        ids = picked.tolist()
        for c, token_id in zip(self.constraints, ids):
            if c is not None and not c.done() and token_id not in self.eos_ids:
                c.advance(token_id)
        return picked, self._logprobs(raw, picked, ids)

    def _logprobs(self, raw: torch.Tensor, picked: torch.Tensor, ids: list[int]) -> list[TokenLogprob] | None:
        if self.logprobs is None:
            return None
        logp = torch.log_softmax(raw, dim=-1)
        chosen = logp.gather(-1, picked.unsqueeze(-1)).squeeze(-1).tolist()
        if self.logprobs > 0:
            values, order = logp.topk(min(self.logprobs, logp.shape[-1]), dim=-1)
            tops = [list(zip(o, v)) for o, v in zip(order.tolist(), values.tolist())]
        else:
            tops = [[] for _ in ids]
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(ids, chosen, tops)]


def _first_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


def accepts_logits_to_keep(model) -> bool:
    """Whether the (peft-unwrapped) model's forward can compute the vocabulary head on selected positions only."""
    try:
        return "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _answer_nll(model, first_logits, past, mask, last_pos, answers, pad_id) -> list[tuple[float, int]]:
    """(summed NLL, target count) of each row's answer tokens, teacher-forced on the prompts' KV cache.

    `first_logits` [B, V] (the prompt's last position) predict each answer's first token; the answers
    (right-padded) run on the cache for the rest, and the cache is cut back to the prompts afterwards, so
    decoding continues from the prompts alone. The formula is `gemcut.eval.scoring.sequence_nll`'s."""
    device, rows, width = first_logits.device, len(answers), max(len(ids) for ids, _ in answers)
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((rows, width), dtype=mask.dtype, device=device)
    targets = torch.zeros((rows, width), dtype=torch.bool, device=device)
    for r, (answer, is_target) in enumerate(answers):
        ids[r, :len(answer)] = torch.tensor(list(answer), dtype=torch.long)
        real[r, :len(answer)] = 1
        targets[r, :len(answer)] = torch.tensor(list(is_target), dtype=torch.bool)
    logits = first_logits[:, None, :]
    if width > 1:
        positions = last_pos + 1 + torch.arange(width - 1, device=device)
        with torch.no_grad():
            rest = model(input_ids=ids[:, :-1], attention_mask=torch.cat([mask, real[:, :-1]], dim=-1),
                         position_ids=positions, use_cache=True, **{cache_argument(model): past}).logits
        past.crop(-(width - 1))
        logits = torch.cat([logits, rest], dim=1)
    nll = token_nll(logits, ids)  # [rows, width]; padding is no target (multiplied by 0 below)
    sums = (nll.double() * targets).sum(dim=1).tolist()
    return [(float(sums[r]), int(targets[r].sum())) for r in range(rows)]


def _token_steps(model, prompt_ids, *, pick: TokenPicker, pad_id, answers=None,
                 answer_nll: list | None = None) -> Iterator[tuple[torch.Tensor, list[TokenLogprob] | None]]:
    """Yield the next token of every row (and its logprobs, when asked), step after step, keeping a KV
    cache; the caller stops it.

    Rows are left-padded; positions count real tokens only, so a padded row sees the same positions as it
    would alone. Finished rows keep being fed (the caller ignores them) so the batch stays rectangular.
    With `answers`, their NLLs are appended to `answer_nll` after the prompt pass, before the first token.
    """
    device = device_of(model)
    # Only the last position's logits are needed: on the prompt that saves the head on every other position.
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    shared = shared_prompt_length(prompt_ids)
    past = None
    if shared >= MIN_SHARED_TOKENS:
        # The tokens every prompt starts with run once (gemcut/models/shared_prefix.py); the rows' own
        # suffixes are left-padded after them, so the padding sits between the prefix and each suffix.
        with torch.no_grad():
            past = prefix_cache(model, torch.tensor([list(prompt_ids[0][:shared])], device=device), len(prompt_ids), **extra)
        step_ids, suffix_mask = _left_pad([p[shared:] for p in prompt_ids], pad_id, device)
        mask = torch.cat([torch.ones((len(prompt_ids), shared), dtype=suffix_mask.dtype, device=device), suffix_mask], dim=-1)
        step_pos = suffix_positions(mask, shared)
    else:
        step_ids, mask = _left_pad(prompt_ids, pad_id, device)
        step_pos = suffix_positions(mask, 0)
    while True:
        with torch.no_grad():
            output = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                           **{cache_argument(model): past}, **extra)
        past = returned_cache(output)
        if past is None:
            raise RuntimeError(f"{type(model).__name__} returned no KV cache; gemcut.generation needs one")
        if answers is not None and answer_nll is not None and not answer_nll:  # once, after the prompt pass
            answer_nll.extend(_answer_nll(model, output.logits[:, -1, :], past, mask, step_pos[:, -1:], answers, pad_id))
        nxt, logprobs = pick(output.logits[:, -1, :])
        yield nxt, logprobs
        step_ids, step_pos = nxt.unsqueeze(-1), step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=-1)


def padding_id(tokenizer, eos_ids) -> int:
    """The id padding columns hold."""
    # The pad id never reaches attention (masked), any valid id will do.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)


class Completion:
    """One row's output as its picked ids arrive: the rules of the module docstring for when it ends and
    what its text is, and the deltas a stream sends. `generate`, `stream_generate` and the server's running
    batch (gemcut/serve/running_batch.py) all go through it, so those rules live once.

        completion = Completion(tokenizer, max_new_tokens=16, eos_ids={2}, stop=["\\n"], stream=True)
        deltas = completion.add(token_id, logprob, constraint_done)   # until completion.finished
        completion.result()                                             # -> GenerationResult

    `add` returns the `StreamDelta`s the id releases (none with `stream=False`; two when the budget ends: the
    token's, then an empty "length" one). Text that could still become a stop string, or half of a
    multi-byte character, is held back until it is final, so a stop string never reaches a client. Without
    `stream` the text is decoded only where a stop string needs it, and once at the end.
    """

    def __init__(self, tokenizer, *, max_new_tokens: int, eos_ids: set[int], stop: Sequence[str] = (), logprobs: bool = False,
                 stream: bool = False):
        self.tokenizer, self.max_new_tokens, self.eos_ids, self.stream = tokenizer, max_new_tokens, eos_ids, stream
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self.finish_reason: str | None = None
        self.text = ""
        self.sent = 0  # characters of the text already sent as deltas

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def add(self, token_id: int, logprob: TokenLogprob | None = None, constraint_done: bool = False) -> list[StreamDelta]:
        """Take the next picked id (`constraint_done`: the row's constraint admits nothing after it)."""
        if token_id in self.eos_ids:
            return self._end("stop", self._decode(), [])
        self.token_ids.append(token_id)
        lp = None if logprob is None else [logprob]
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        text = self._decode() if self.stream or self.stop else None
        cut = _first_stop(text, self.stop) if self.stop else -1
        if cut >= 0:
            return self._end("stop", text[:cut], [token_id], lp)
        if constraint_done:
            return self._end("stop", text, [token_id], lp)
        deltas = []
        if self.stream:
            ready = len(text) - _held_back(text, self.stop)
            deltas.append(StreamDelta(text[self.sent:ready] if ready > self.sent else "", [token_id], logprobs=lp))
            self.sent = max(self.sent, ready)
        if len(self.token_ids) >= self.max_new_tokens:
            deltas += self._end("length", text, [])
        return deltas

    def _end(self, reason: str, text: str | None, token_ids: list[int], lp=None) -> list[StreamDelta]:
        self.finish_reason, self.text = reason, self._decode() if text is None else text
        if not self.stream:
            return []
        return [StreamDelta(self.text[self.sent:] if len(self.text) > self.sent else "", token_ids, reason, lp)]

    def result(self) -> GenerationResult:
        return GenerationResult(self.text, list(self.token_ids), self.finish_reason or "length",
                                logprobs=None if self.logprobs is None else list(self.logprobs))


def _generate_batch(model, tokenizer, prompt_ids, *, max_new_tokens, pick: TokenPicker, stop, eos_ids, answers=None):
    answer_nll: list[tuple[float, int]] = []
    steps = _token_steps(model, prompt_ids, pick=pick, pad_id=padding_id(tokenizer, eos_ids), answers=answers, answer_nll=answer_nll)
    rows = [Completion(tokenizer, max_new_tokens=max_new_tokens, eos_ids=eos_ids, stop=stop, logprobs=pick.logprobs is not None)
            for _ in prompt_ids]
    for _ in range(max_new_tokens):
        nxt, logprobs = next(steps)
        for i, token_id in enumerate(nxt.tolist()):
            if not rows[i].finished:
                rows[i].add(token_id, None if logprobs is None else logprobs[i], pick.constraint_done(i))
        if all(row.finished for row in rows):
            break
    steps.close()
    results = [row.result() for row in rows]
    for i, result in enumerate(results):
        if answer_nll:
            result.answer_nll = answer_nll[i]
    return results


def _check(max_new_tokens: int, temperature: float, top_p: float, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
           logprobs: int | None = None) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -2 <= value <= 2:
            raise ValueError(f"{name} must be in [-2, 2], got {value}")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")


def sampling_generator(temperature: float, seed: int | Sequence[int] | None) -> torch.Generator | list[torch.Generator] | None:
    """The sampling generator: one for the batch, or one per row when `seed` is a list (one seed per prompt)."""
    if temperature == 0:
        return None
    if isinstance(seed, Sequence):
        return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed]
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else int(torch.seed()))
    return generator


def resolve_eos_ids(model, tokenizer, eos_ids) -> set[int]:
    if eos_ids is None:
        return default_eos_ids(model, tokenizer)
    return {int(eos_ids)} if isinstance(eos_ids, int) else {int(e) for e in eos_ids}


def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | Sequence[int] | None = None, stop: list[str] | None = None, eos_ids=None,
             batch_size: int | None = None, answers: list[tuple[list[int], list[bool]]] | None = None,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
             constraints: list[Constraint | None] | None = None, logprobs: int | None = None) -> list[GenerationResult]:
    """Complete each prompt (a list of token ids) with at most `max_new_tokens` tokens.

    Args:
        model: a causal LM (transformers or peft) in eval mode; it is not moved.
        tokenizer: decodes the generated ids (special tokens are dropped from `text`).
        prompt_ids: one list of token ids per prompt, already templated (see `generate_messages`).
        temperature: 0 means greedy; > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling mass (only with temperature > 0).
        seed: seeds the sampling generator; the same seed, prompts and batch_size give the same output. A list
            of seeds, one per prompt, gives each row a generator of its own: a prompt's completion then does not
            depend on which other prompts share its batch (RL on any number of processes).
        stop: strings that end a completion; the text is cut before the first one.
        eos_ids: ids that end a completion; default: the tokenizer's and the model's eos ids.
        batch_size: prompts per forward batch; None runs all prompts as one batch.
        answers: per prompt, (answer ids, which of them are targets): the answer's NLL given the prompt is
            computed on the prompt pass's cache (evaluation's reference loss without a second prompt pass)
            and returned as `answer_nll`; it does not change what is generated.
        presence_penalty, frequency_penalty: OpenAI's penalties in [-2, 2] (`apply_penalties`), over each
            row's own generated tokens.
        logit_bias: token id -> value added to that token's logit at every step.
        constraints: one `Constraint` (or None) per prompt: what its output may be.
        logprobs: None, or k in [0, 20]: each token's logprob and the k most likely tokens (`TokenLogprob`).
    Returns: one `GenerationResult` per prompt, in order.
    """
    _check(max_new_tokens, temperature, top_p, presence_penalty, frequency_penalty, logprobs)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token; got an empty prompt")
    if answers is not None and (len(answers) != len(prompt_ids) or any(not a for a, _ in answers)):
        raise ValueError("answers needs one non-empty (ids, targets) pair per prompt")
    if constraints is not None and len(constraints) != len(prompt_ids):
        raise ValueError(f"constraints needs one entry (or None) per prompt: {len(constraints)} for {len(prompt_ids)} prompts")
    eos_set = resolve_eos_ids(model, tokenizer, eos_ids)
    if isinstance(seed, Sequence) and len(seed) != len(prompt_ids):
        raise ValueError(f"seed needs one value per prompt: {len(seed)} for {len(prompt_ids)} prompts")
    generator = sampling_generator(temperature, seed)
    was_training = model.training
    model.eval()
    try:
        size = batch_size or max(1, len(prompt_ids))
        results: list[GenerationResult] = []
        for start in range(0, len(prompt_ids), size):
            rows = prompt_ids[start:start + size]
            rows_generator = generator[start:start + size] if isinstance(generator, list) else generator
            pick = TokenPicker(len(rows), temperature=temperature, top_p=top_p, generator=rows_generator, eos_ids=eos_set,
                           presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
                           constraints=None if constraints is None else constraints[start:start + size], logprobs=logprobs)
            results.extend(_generate_batch(model, tokenizer, rows, max_new_tokens=max_new_tokens, pick=pick,
                                           stop=list(stop or []), eos_ids=eos_set,
                                           answers=None if answers is None else answers[start:start + size]))
        return results
    finally:
        if was_training:
            model.train()


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string (or are a half-decoded byte)."""
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
        hold = max(hold, 1)
    return hold


def stream_generate(model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                    eos_ids=None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    logit_bias: dict[int, float] | None = None, constraint: Constraint | None = None,
                    logprobs: int | None = None) -> Iterator[StreamDelta]:
    """Yield one `StreamDelta` per generated token for one prompt (serving's `stream: true`, `gemcut chat`).

    Same arguments, decoding steps and seeding as `generate` for a single prompt (`constraint` is that
    prompt's one), so the concatenated texts equal `generate(...)[0].text`. Text that might be the start of
    a stop string, or half of a multi-byte character, is held back until it is known to be final, so a stop
    string never reaches the client.
    """
    _check(max_new_tokens, temperature, top_p, presence_penalty, frequency_penalty, logprobs)
    if not prompt_ids:
        raise ValueError("the prompt needs at least one token; got an empty prompt")
    eos_set = resolve_eos_ids(model, tokenizer, eos_ids)
    stop = [s for s in (stop or []) if s]
    was_training = model.training
    model.eval()
    pick = TokenPicker(1, temperature=temperature, top_p=top_p, generator=sampling_generator(temperature, seed), eos_ids=eos_set,
                       presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
                       constraints=[constraint], logprobs=logprobs)
    steps = _token_steps(model, [list(prompt_ids)], pick=pick, pad_id=padding_id(tokenizer, eos_set))
    completion = Completion(tokenizer, max_new_tokens=max_new_tokens, eos_ids=eos_set, stop=stop, logprobs=logprobs is not None,
                            stream=True)
    try:
        while not completion.finished:
            nxt, lps = next(steps)
            yield from completion.add(int(nxt[0]), None if lps is None else lps[0], pick.constraint_done(0))
    finally:
        steps.close()
        if was_training:
            model.train()


def generate_messages(model, tokenizer, template, messages_list: list[list[dict]], **kwargs) -> list[GenerationResult]:
    """Generate the next assistant turn for each conversation, using the run's chat template.

    `template.prompt_ids(messages)` renders the conversation plus the assistant header (the same template
    used in training and serving); keyword arguments go to `generate`.
    """
    prompts = [list(template.prompt_ids(messages)) for messages in messages_list]
    return generate(model, tokenizer, prompts, **kwargs)

