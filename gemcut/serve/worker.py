"""The one worker thread that runs every model call, in batches.

    python -m pytest -q tests/test_serve_queue.py
    worker = Worker(settings, metrics, registry.lock); worker.start()
    fut = worker.submit(GenJob(registry.get("my-run"), prompts=[prompt_ids], max_new_tokens=32))   # 429 when full

Requests wait in a bounded queue (full -> 429). The thread takes a request and, for up to `batch_wait_ms`,
gathers compatible ones (same model and sampling parameters, unseeded or greedy) into one `generate` call
of at most `max_batch` sequences. One thread, one model call at a time: concurrent clients neither crash
the server nor oversubscribe the CPU. Seeded sampling runs alone, so its output does not depend on what
else was queued; streaming runs alone, token by token, each delta put on the job's asyncio queue and
STREAM_END after the last.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from gemcut.models.numerics import classifier_logits, device_of, right_pad, unwrap_peft
from gemcut.serve.errors import APIError
from gemcut.serve.metrics import Metrics
from gemcut.serve.registry import ServedModel
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

    def size(self) -> int:
        return len(self.prompts)

    def batch_key(self):
        if self.stream is not None or (self.seed is not None and self.temperature > 0):
            return None  # runs alone: streamed token by token, or seeded and so reproducible on its own
        # Greedy rows do not depend on their batch neighbours, so the seed does not matter there.
        return ("gen", self.served.name, self.max_new_tokens, self.temperature, self.top_p, tuple(self.stop), self.presence_penalty,
                self.frequency_penalty, tuple(sorted(self.logit_bias.items())), self.logprobs, self.grammar)

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


@dataclass
class EmbedJob(Job):
    """Embed each of `inputs` (token ids, within the context)."""

    inputs: list[list[int]] = field(default_factory=list)

    def size(self) -> int:
        return len(self.inputs)

    def batch_key(self):
        return ("embed", self.served.name)


@dataclass
class ClassifyJob(Job):
    """Per-label probabilities of each of `texts` (cut to the context)."""

    texts: list[str] = field(default_factory=list)

    def size(self) -> int:
        return len(self.texts)

    def batch_key(self):
        return ("classify", self.served.name)


class Worker:
    """The queue and the thread that empties it; thread-safe `submit`.

    `lock` is held around every model call; the registry holds it while it adds a model (adding an
    adapter changes the shared model)."""

    def __init__(self, settings: ServeSettings, metrics: Metrics | None = None, lock: threading.Lock | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.lock = lock or threading.Lock()
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self.held: Job | None = None  # taken from the queue but not fitting the last batch; runs next
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def depth(self) -> int:
        """Requests waiting: the queue plus the one held back for the next batch."""
        return self.queue.qsize() + (1 if self.held is not None else 0)

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
        # Whatever is still waiting gets an answer instead of hanging its client.
        while True:
            job = self.held or self._take(0)
            self.held = None
            if job is None:
                break
            self._fail(job, APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))

    # ------------------------------------------------------------------ batching

    def _take(self, timeout: float) -> Job | None:
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _next_batch(self) -> list[Job]:
        first, self.held = self.held, None
        first = first or self._take(0.1)
        if first is None:
            return []
        batch, key, size = [first], first.batch_key(), first.size()
        if key is None:
            return batch
        deadline = time.perf_counter() + self.settings.batch_wait_ms / 1000
        while size < self.settings.max_batch:
            job = self._take(max(0.0, deadline - time.perf_counter()))
            if job is None:
                break
            if job.batch_key() != key or size + job.size() > self.settings.max_batch:
                self.held = job  # first in line for the next batch: arrival order is kept
                break
            batch.append(job)
            size += job.size()
        return batch

    def _run(self) -> None:
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        while not self._stop.is_set():
            batch: list[Job] = []
            try:
                batch = self._next_batch()
                self.metrics.queue_depth.set(self.depth())
                if not batch:
                    continue
                with self.lock:
                    now = time.perf_counter()
                    for job in batch:
                        job.started = now
                        self.metrics.queue_wait.labels(model=job.served.name).observe(now - job.enqueued)
                    self._execute(batch)
            except APIError as e:
                for job in batch:
                    self._fail(job, e)
            except Exception:  # a fault in one batch must not kill the worker: fail that batch, go on
                log.exception("model call failed")
                err = APIError(500, "the model call failed; the details are in the server's log", type="server_error", code="model_error")
                for job in batch:
                    self._fail(job, err)

    def _fail(self, job: Job, err: Exception) -> None:
        if isinstance(job, GenJob) and job.stream is not None:
            job.loop.call_soon_threadsafe(job.stream.put_nowait, err)
            job.loop.call_soon_threadsafe(job.stream.put_nowait, STREAM_END)
        if not job.future.done():
            job.future.set_exception(err)

    # ------------------------------------------------------------------ model calls

    def _execute(self, batch: list[Job]) -> None:
        first = batch[0]
        with torch.inference_mode(), first.served.activate():
            if isinstance(first, ClassifyJob):
                self._classify(batch)
            elif isinstance(first, EmbedJob):
                self._embed(batch)
            elif first.stream is not None:
                self._stream(first)
            else:
                self._generate(batch)

    def _generate(self, batch: list[GenJob]) -> None:
        from gemcut.generation import generate

        j = batch[0]
        prompts = [p for job in batch for p in job.prompts]
        t0 = time.perf_counter()
        constraints = [job.constraint() for job in batch for _ in job.prompts] if j.grammar is not None else None
        results = generate(j.served.model, j.served.tokenizer, prompts, max_new_tokens=j.max_new_tokens, seed=j.seed,
                           constraints=constraints, **j.options())
        dt = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in results)
        self._count_tokens(j.served.name, tokens, dt, len(prompts))
        _answer(batch, results)

    def _stream(self, job: GenJob) -> None:
        from gemcut.generation import stream_generate

        t0, tokens = time.perf_counter(), 0
        finishes = []
        for index, prompt in enumerate(job.prompts):
            # n > 1 streams the choices one after the other, each with its own seed offset
            seed = None if job.seed is None else job.seed + index
            finish = "length"
            for delta in stream_generate(job.served.model, job.served.tokenizer, prompt, max_new_tokens=job.max_new_tokens,
                                         seed=seed, constraint=job.constraint(), **job.options()):
                tokens += len(delta.token_ids)
                job.loop.call_soon_threadsafe(job.stream.put_nowait, (index, delta))
                if delta.finish_reason:
                    finish = delta.finish_reason
                if job.cancelled:
                    break
            finishes.append(finish)
            if job.cancelled:
                break
        self._count_tokens(job.served.name, tokens, time.perf_counter() - t0, 1)
        job.loop.call_soon_threadsafe(job.stream.put_nowait, STREAM_END)
        job.future.set_result({"completion_tokens": tokens, "finish_reasons": finishes})

    def _classify(self, batch: list[ClassifyJob]) -> None:
        served = batch[0].served
        texts = [t for job in batch for t in job.texts]
        rows = served.tokenizer(texts, truncation=True, max_length=served.context_length)["input_ids"]
        logits = classifier_logits(served.model, served.tokenizer, rows, batch_size=len(rows))
        probs = torch.softmax(logits, dim=-1).cpu().tolist()
        self.metrics.batch_size.observe(len(texts))
        _answer(batch, probs)

    def _embed(self, batch: list[EmbedJob]) -> None:
        """L2-normalised pooled last hidden states (the served model's pooling), one list of floats per input."""
        served = batch[0].served
        inputs = [ids for job in batch for ids in job.inputs]
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
        vectors = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        self.metrics.batch_size.observe(len(inputs))
        _answer(batch, vectors)

    def _count_tokens(self, name: str, tokens: int, seconds: float, batch: int) -> None:
        self.metrics.generated_tokens.labels(model=name).inc(tokens)
        self.metrics.batch_size.observe(batch)
        if seconds > 0:
            self.metrics.tokens_per_second.labels(model=name).set(tokens / seconds)


def _answer(batch: list[Job], results) -> None:
    """Give each job of the batch its slice of `results` (one entry per prompt, text or input, in order)."""
    i = 0
    for job in batch:
        job.future.set_result(results[i:i + job.size()])
        i += job.size()
