"""The one worker thread that runs every model call: continuous batching of completions, token-budget
batches of classifier and embedding inputs.

    python -m pytest -q tests/test_serve_queue.py tests/test_serve_batching.py
    worker = Worker(settings, metrics, registry.lock); worker.start()
    fut = worker.submit(GenJob(registry.get("my-run"), prompts=[prompt_ids], max_new_tokens=32))   # 429 when full

Requests wait in a bounded queue (full -> 429). The thread loops: it admits what waits, runs the admitted
classifier and embedding requests, prefills the admitted completions and then runs one decode step of all
sequences (gemcut/serve/running_batch.py). So a completion that arrives while others decode joins them at
the next step, and a finished one leaves at once, streaming or not; a request's `n` choices decode
together, each choice `i` sampling with its own generator seeded `seed + i`, so a seeded answer depends
on nothing else that was queued and a stream equals the non-streamed answer. Only one served model decodes
at a time (adapters share one base: `ServedModel.activate` sets the adapter); a request for another model
waits, first in line, until the running sequences have finished, and nothing behind it is admitted
before it. At most `max_batch` sequences decode together. When the worker is idle it waits up to
`batch_wait_ms` for requests to start with.

Classifier (and embedding) requests queued together for one model run together, split into forward
passes of at most `max_batch_tokens` tokens (rows × longest row, rows sorted by length so that little is
padding). One thread, one model call at a time (the registry's lock is held around each cycle):
concurrent clients neither crash the server nor oversubscribe the CPU.

Metrics (gemcut/serve/metrics.py): time to first token and inter-token latency per model, sequences per
decode step, queue wait.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from gemcut.generation import Completion, GenerationResult, TokenPicker, sampling_generator
from gemcut.models.numerics import classifier_logits, device_of, right_pad, unwrap_peft
from gemcut.serve.errors import APIError
from gemcut.serve.metrics import Metrics
from gemcut.serve.registry import ServedModel
from gemcut.serve.running_batch import Event, Row, RunningBatch
from gemcut.serve.settings import ServeSettings

log = logging.getLogger("gemcut.serve")

STREAM_END = object()  # the last item a streaming job's queue receives


@dataclass
class Job:
    served: ServedModel
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    cancelled: bool = False  # set by a streaming client that went away

    def size(self) -> int:
        return 1

    def batch_key(self):
        return None

    def tokens(self) -> int:
        """Tokens this job puts in a forward pass (the token budget of classifier and embedding batches)."""
        return 0


@dataclass
class GenJob(Job):
    """Complete each of `prompts` (token ids; n>1 is n copies of one prompt)."""

    prompts: list[list[int]] = field(default_factory=list)
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # top-k per token; None: no logprobs
    grammar: str | None = None  # response_format's llguidance grammar (gemcut/serve/structured.py); one matcher per choice
    # Streaming: deltas go to this asyncio queue on `loop`; (index, StreamDelta) items, then STREAM_END.
    stream: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    # Filled by the worker as the choices finish.
    results: list[GenerationResult | None] = field(default_factory=list)
    first_token_at: float = 0.0

    def size(self) -> int:
        return len(self.prompts)

    def options(self) -> dict:
        """The keyword arguments of `generate` / `stream_generate` this job sets beyond the budget and seed."""
        return dict(temperature=self.temperature, top_p=self.top_p, stop=self.stop or None, eos_ids=self.served.eos_ids(),
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    logit_bias=self.logit_bias or None, logprobs=self.logprobs)

    def constraint(self):
        """A fresh constraint for one choice (None without response_format)."""
        if self.grammar is None:
            return None
        from gemcut.serve.structured import Vocabulary

        return Vocabulary.of(self.served).constraint(self.grammar)

    def rows(self) -> list[tuple[list[int], list[Row]]]:
        """The job's choices as running-batch rows, grouped by prompt (n copies of one prompt are one group:
        its prompt is prefilled once)."""
        eos = self.served.eos_ids()
        groups: dict[tuple[int, ...], list[Row]] = {}
        for choice, prompt in enumerate(self.prompts):
            seed = None if self.seed is None else self.seed + choice
            picker = TokenPicker(1, temperature=self.temperature, top_p=self.top_p, generator=sampling_generator(self.temperature, seed),
                                 eos_ids=eos, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                 logit_bias=self.logit_bias or None, constraints=[self.constraint()], logprobs=self.logprobs)
            completion = Completion(self.served.tokenizer, max_new_tokens=self.max_new_tokens, eos_ids=eos, stop=self.stop,
                                    logprobs=self.logprobs is not None, stream=self.stream is not None)
            groups.setdefault(tuple(prompt), []).append(Row(self, choice, picker, completion))
        return [(list(prompt), rows) for prompt, rows in groups.items()]


@dataclass
class EmbedJob(Job):
    """Embed each of `inputs` (token ids, within the context)."""

    inputs: list[list[int]] = field(default_factory=list)

    def size(self) -> int:
        return len(self.inputs)

    def batch_key(self):
        return ("embed", self.served.name)

    def tokens(self) -> int:
        return sum(map(len, self.inputs))


@dataclass
class ClassifyJob(Job):
    """Per-label probabilities of each of `texts` (cut to the context). `ids`: their token ids when the
    caller has them (else tokenised here)."""

    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] | None = None

    def size(self) -> int:
        return len(self.texts)

    def batch_key(self):
        return ("classify", self.served.name)

    def token_ids(self) -> list[list[int]]:
        if self.ids is None:
            self.ids = [list(r) for r in self.served.tokenizer(self.texts, truncation=True, max_length=self.served.context_length)["input_ids"]]
        return self.ids

    def tokens(self) -> int:
        return sum(map(len, self.token_ids()))


def token_budget_passes(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of rows (of these token lengths) grouped into forward passes of at most `budget` padded
    tokens (rows × longest row; a row over the budget alone is a pass of its own), shortest rows first."""
    passes: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[i] > budget:
            passes.append(current)
            current = []
        current.append(i)
    return passes + ([current] if current else [])


class Worker:
    """The queue and the thread that empties it; thread-safe `submit`.

    `lock` is held around every model call; the registry holds it while it adds a model (adding an
    adapter changes the shared model)."""

    def __init__(self, settings: ServeSettings, metrics: Metrics | None = None, lock: threading.Lock | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.lock = lock or threading.Lock()
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        # Taken from the queue but not started (a request for another model, or one that does not fit
        # yet); they start first, in arrival order.
        self.waiting: collections.deque[Job] = collections.deque()
        self.batches: dict[str, RunningBatch] = {}  # per served name; one decodes at a time
        self.active: RunningBatch | None = None  # the one with sequences
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def held(self) -> Job | None:
        """The first request taken from the queue that waits to start (None when none does)."""
        return self.waiting[0] if self.waiting else None

    def depth(self) -> int:
        """Requests waiting: the queue plus those taken from it but not started."""
        return self.queue.qsize() + len(self.waiting)

    def decoding(self) -> int:
        """Sequences in the running batch."""
        return len(self.active) if self.active is not None else 0

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; raises a 429 APIError when the queue is full (the client should retry later)."""
        if not self.running:
            raise APIError(503, "the model worker is not running", type="server_error", code="worker_stopped")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self.settings.max_queue} requests are already waiting; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self.depth())
        return job.future

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gemcut-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        # Whatever is still waiting or decoding gets an answer instead of hanging its client.
        err = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.active is not None:
            self._fail_rows(self.active.leave(lambda row: True), err)
        while True:
            job = self.waiting.popleft() if self.waiting else self._take(0)
            if job is None:
                break
            self._fail(job, err)

    # ------------------------------------------------------------------ admission

    def _take(self, timeout: float) -> Job | None:
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _next(self, timeout: float) -> Job | None:
        return self.waiting.popleft() if self.waiting else self._take(timeout)

    def _admit(self) -> tuple[list[GenJob], list[list[Job]]]:
        """The completions to join the running batch now and the groups of other jobs to run now.

        A completion joins when it is for the model that decodes (or, with none decoding, the first one's)
        and its choices fit in `max_batch`; the first that does not waits, and nothing behind it is taken."""
        generating: list[GenJob] = []
        groups: dict[object, list[Job]] = {}
        idle = self.decoding() == 0
        job = self._next(0.1 if idle else 0)
        deadline = time.perf_counter() + self.settings.batch_wait_ms / 1000 if idle else 0.0
        rows = self.decoding()
        model = self.active.served.name if rows else None
        while job is not None:
            if isinstance(job, GenJob):
                model = model or job.served.name
                batch = self.batches.get(job.served.name)
                fits = job.served.name == model and (rows == 0 or rows + job.size() <= self.settings.max_batch)
                if not fits or (rows and batch is not None and not batch.accepts_more()):
                    self.waiting.appendleft(job)
                    break
                generating.append(job)
                rows += job.size()
            else:
                group = groups.setdefault(job.batch_key(), [])
                try:
                    over = group and sum(j.tokens() for j in group) + job.tokens() > self.settings.max_batch_tokens
                except Exception:  # its texts do not tokenise: answer it, never drop it
                    log.exception("tokenising a request failed")
                    self._fail(job, _model_error())
                    over, job = False, None
                if over:
                    self.waiting.appendleft(job)  # runs in the next cycle, with what queues behind it
                    break
                if job is not None:
                    group.append(job)
            if rows >= self.settings.max_batch:
                break  # no room for another completion: what queues stays in the queue (and counts toward 429)
            job = self._next(max(0.0, deadline - time.perf_counter()))
        return generating, list(groups.values())

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        while not self._stop.is_set():
            try:
                self._cycle()
            except Exception:  # a fault here must not kill the worker: its requests were failed where it happened
                log.exception("model worker cycle failed")

    def _cycle(self) -> None:
        generating, groups = self._admit()
        self.metrics.queue_depth.set(self.depth())
        if not generating and not groups and not self.decoding():
            return
        with self.lock:
            now = time.perf_counter()
            for job in generating + [job for group in groups for job in group]:
                job.started = now
                self.metrics.queue_wait.labels(model=job.served.name).observe(now - job.enqueued)
            for group in groups:
                self._guarded(group, self._forward_group, group)
            self._guarded(generating, self._join, generating)
            if self.active is not None:  # streams whose client went away end where they are
                for row in self.active.leave(lambda row: row.owner.cancelled):
                    self._finish_row(row)
            if self.decoding():
                self._step()

    def _guarded(self, jobs: list[Job], call, *args) -> None:
        """Run `call(*args)`; a failure answers `jobs` (and only them) with the error."""
        try:
            call(*args)
        except APIError as e:
            for job in jobs:
                self._fail(job, e)
        except Exception:
            log.exception("model call failed")
            for job in jobs:
                self._fail(job, _model_error())

    def _batch_for(self, served: ServedModel) -> RunningBatch:
        batch = self.batches.get(served.name)
        if batch is None or batch.served is not served:  # a name served anew gets a batch (and prefix) of its own
            batch = self.batches[served.name] = RunningBatch(served)
        return batch

    # ------------------------------------------------------------------ completions

    def _join(self, jobs: list[GenJob]) -> None:
        """Prefill the admitted completions (one forward pass for those that share a prefix) into the running
        batch; with a cache that cannot take rows (sliding window), those that come while others decode wait."""
        if not jobs:
            return
        batch = self._batch_for(jobs[0].served)
        if not batch.accepts_more():
            self.waiting.extendleft(reversed(jobs))
            return
        requests = []
        for job in jobs:
            job.results = [None] * job.size()
            requests += job.rows()
        with torch.inference_mode(), batch.served.activate():
            events = batch.join(requests)
        if len(batch):
            self.active = batch
        self._deliver(events, time.perf_counter())

    def _step(self) -> None:
        batch = self.active
        rows = len(batch)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(), batch.served.activate():
                events = batch.step()
        except Exception as e:
            log.exception("decode step failed")
            self._fail_rows(batch.leave(lambda row: True), e if isinstance(e, APIError) else _model_error())
            return
        now = time.perf_counter()
        self.metrics.batch_size.observe(rows)
        self.metrics.tokens_per_second.labels(model=batch.served.name).set(rows / max(now - t0, 1e-9))
        self._deliver(events, now)

    def _deliver(self, events: list[Event], now: float) -> None:
        """Send each row's new deltas (streams), time its token, answer the jobs whose choices have all finished."""
        for row, deltas in events:
            job: GenJob = row.owner
            name = job.served.name
            if not job.first_token_at:
                job.first_token_at = now
                self.metrics.time_to_first_token.labels(model=name).observe(now - job.enqueued)
            elif row.last_token_at:
                self.metrics.inter_token_latency.labels(model=name).observe(now - row.last_token_at)
            row.last_token_at = now
            if job.stream is not None:
                for delta in deltas:
                    job.loop.call_soon_threadsafe(job.stream.put_nowait, (row.choice, delta))
            if row.completion.finished:
                self._finish_row(row)

    def _finish_row(self, row: Row) -> None:
        job: GenJob = row.owner
        job.results[row.choice] = row.completion.result()
        if any(r is None for r in job.results):
            return
        tokens = sum(len(r.token_ids) for r in job.results)
        self.metrics.generated_tokens.labels(model=job.served.name).inc(tokens)
        if job.stream is not None:
            job.loop.call_soon_threadsafe(job.stream.put_nowait, STREAM_END)
            if not job.future.done():
                job.future.set_result({"completion_tokens": tokens, "finish_reasons": [r.finish_reason for r in job.results]})
        elif not job.future.done():
            job.future.set_result(job.results)

    def _fail_rows(self, rows: list[Row], err: Exception) -> None:
        for job in {id(row.owner): row.owner for row in rows}.values():
            self._fail(job, err)

    def _fail(self, job: Job, err: Exception) -> None:
        if isinstance(job, GenJob) and job.stream is not None:
            job.loop.call_soon_threadsafe(job.stream.put_nowait, err)
            job.loop.call_soon_threadsafe(job.stream.put_nowait, STREAM_END)
        if not job.future.done():
            job.future.set_exception(err)

    # ------------------------------------------------------------------ classifiers and encoders

    def _forward_group(self, group: list[Job]) -> None:
        first = group[0]
        with torch.inference_mode(), first.served.activate():
            if isinstance(first, ClassifyJob):
                self._classify(group)
            else:
                self._embed(group)

    def _passes(self, rows: list[list[int]]) -> list[list[int]]:
        passes = token_budget_passes([len(r) for r in rows], self.settings.max_batch_tokens)
        for indices in passes:
            self.metrics.batch_size.observe(len(indices))
        return passes

    def _classify(self, group: list[ClassifyJob]) -> None:
        served = group[0].served
        rows = [ids for job in group for ids in job.token_ids()]
        probs: list = [None] * len(rows)
        for indices in self._passes(rows):
            logits = classifier_logits(served.model, served.tokenizer, [rows[i] for i in indices], batch_size=len(indices))
            for i, p in zip(indices, torch.softmax(logits, dim=-1).cpu().tolist()):
                probs[i] = p
        _answer(group, probs)

    def _embed(self, group: list[EmbedJob]) -> None:
        """L2-normalised pooled last hidden states (the served model's pooling), one list of floats per input."""
        served = group[0].served
        inputs = [ids for job in group for ids in job.inputs]
        vectors = [None] * len(inputs)
        for indices in self._passes(inputs):
            for i, v in zip(indices, _pooled(served, [inputs[i] for i in indices])):
                vectors[i] = v
        _answer(group, torch.stack(vectors))


def _pooled(served: ServedModel, inputs: list[list[int]]) -> torch.Tensor:
    pad = served.tokenizer.pad_token_id if served.tokenizer.pad_token_id is not None else 0
    ids, mask = right_pad(inputs, pad)  # right padding, as encoders are trained
    device = device_of(served.model)
    ids, mask = ids.to(device), mask.to(device)
    if served.classifies:
        # The classifier's encoder with gemcut's pooling installed (gemcut/models/pooling.py) hands over the
        # pooled vector where the head reads the first token, for cls and mean alike.
        inner = unwrap_peft(served.model)
        pooled = getattr(inner, inner.base_model_prefix)(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    else:
        from gemcut.models.pooling import masked_mean

        hidden = served.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = hidden[:, 0] if served.pooling == "cls" else masked_mean(hidden, mask.bool())
    return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


def _model_error() -> APIError:
    return APIError(500, "the model call failed; the details are in the server's log", type="server_error", code="model_error")


def _answer(batch: list[Job], results) -> None:
    """Give each job of the batch its slice of `results` (one entry per prompt, text or input, in order)."""
    i = 0
    for job in batch:
        job.future.set_result(results[i:i + job.size()])
        i += job.size()
