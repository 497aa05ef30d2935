"""The model registry and the one worker thread that runs every model call, in batches.

    engine = Engine(settings, metrics); engine.add("runs/my-run"); engine.start()
    fut = engine.submit(GenJob(engine.get("my-run"), [prompt_ids], max_new_tokens=32))   # 429 when full

Registry: each `--model` is a run folder (loaded with `gemcut.models.load.load_run`), an exported folder
(plain transformers, or gemcut's int8 format), or a model name resolved by `gemcut.models.resolve`. A
folder of a plain encoder (`BertModel`, `...ForMaskedLM`) is served for /v1/embeddings only (task "embed"). LoRA
runs on the same base share one loaded base model: the first becomes a peft model, later ones are added
with `load_adapter` and picked per batch with `set_adapter`; the base itself is served through
`disable_adapter()` on the same weights.

Worker: requests wait in a bounded queue (full -> 429). One thread takes a request and, for up to
`batch_wait_ms`, gathers compatible ones (same model and sampling parameters, unseeded or greedy) into one
`generate` call of at most `max_batch` sequences. One thread, one model call at a time: concurrent clients
neither crash the server nor oversubscribe the CPU. Seeded sampling runs alone, so its output does not
depend on what else was queued; streaming runs alone, token by token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemcut.errors import GemcutError
from gemcut.serve.errors import APIError
from gemcut.serve.metrics import Metrics
from gemcut.serve.settings import ServeSettings

log = logging.getLogger("gemcut.serve")

_DONE = object()  # end of a stream


@dataclass
class ServedModel:
    """One name in /v1/models and everything needed to answer for it."""

    name: str
    task: str  # "causal_lm", "classify" or "embed" (a plain encoder: embeddings only)
    model: Any  # nn.Module; for adapters, the shared peft model
    tokenizer: Any
    template: Any | None  # has prompt_ids(messages) -> list[int]; None: chat is refused
    context_length: int
    adapter: str | None = None  # peft adapter to activate; None on a peft model means "adapters disabled"
    labels: list[str] | None = None
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    pooling: str | None = None  # embeddings: "cls" or "mean" (gemcut/models/pooling.py); None: no embeddings
    vocabulary: Any = None  # gemcut.serve.structured.Vocabulary, built on first use

    def eos_ids(self) -> set[int]:
        """Ids that end a completion: the model's and tokenizer's eos plus the template's end-of-turn tokens."""
        from gemcut.generation import default_eos_ids

        ids = set(default_eos_ids(self.model, self.tokenizer))
        if self.template is not None:
            ids.update(self.template.stop_token_ids)
        return ids

    def activate(self):
        """Context in which `self.model` computes this served model (right adapter, or none)."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            if self.adapter is None:
                return self.model.disable_adapter()
            self.model.set_adapter(self.adapter)
        return contextlib.nullcontext()


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
    # Streaming: deltas go to this asyncio queue on `loop`; (index, StreamDelta) items, then _DONE.
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
    texts: list[str] = field(default_factory=list)

    def size(self) -> int:
        return len(self.texts)

    def batch_key(self):
        return ("classify", self.served.name)


def _context_length(model, tokenizer) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    tmax = getattr(tokenizer, "model_max_length", None)
    candidates = [int(x) for x in (n, tmax) if isinstance(x, int) and 0 < x < 10_000_000]
    return min(candidates) if candidates else 2048


def _pooling(model) -> str | None:
    """How a served classifier pools (its embeddings are that vector); None: one gemcut does not pool."""
    from gemcut.models.pooling import classifier_pooling

    return classifier_pooling(model)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    """Holds the served models and the worker thread; thread-safe `submit`."""

    def __init__(self, settings: ServeSettings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.device = _pick_device(settings.device)
        self.models: dict[str, ServedModel] = {}
        self._groups: dict[str, Any] = {}  # base name -> shared peft model
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self._held: Job | None = None  # taken from the queue but not fitting the last batch; runs next
        # Held while the model computes, and while models are added: adding an adapter mutates the shared model.
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ registry

    def add(self, source: str, name: str | None = None) -> ServedModel:
        """Load a run folder, exported folder or model name and serve it under `name` (default: folder name)."""
        with self.lock:
            served = self._load(source, name)
            if served.name in self.models:
                raise GemcutError(f"two models would both be served as {served.name!r} ({self.models[served.name].source} and {source}); "
                                  "rename one folder")
            self.models[served.name] = served
            log.info("serving %s (%s, context %d) from %s", served.name, served.task, served.context_length, source)
            return served

    def get(self, name: str | None) -> ServedModel:
        if not name:
            raise APIError(400, "`model` is required; GET /v1/models lists the served names", param="model", code="missing_model")
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"the model {name!r} does not exist; served models: {', '.join(sorted(self.models)) or 'none'}",
                           param="model", code="model_not_found")
        return served

    def _load(self, source: str, name: str | None) -> ServedModel:
        path = Path(source).expanduser()
        shared = self._groups.get(source) or self._groups.get(str(path.resolve()))
        if shared is not None:
            # The base of adapters already served: the same weights with adapters switched off, no second copy.
            sibling = next(m for m in self.models.values() if m.model is shared)
            return ServedModel(name or path.name or source, "causal_lm", shared, sibling.tokenizer, sibling.template,
                               sibling.context_length, adapter=None, source=source)
        if path.is_dir() and (path / "quantize_config.json").is_file():
            from gemcut.models.int8 import load_int8

            model, tokenizer = load_int8(path)
            return self._plain(model, tokenizer, name or path.name, str(path), self._labels_file(path))
        if path.is_dir() and (path / "final").is_dir():
            return self._load_run(path, name)
        if path.is_dir() and path.name == "final" and (path / "gemcut_run.json").is_file():
            return self._load_run(path.parent, name)
        if path.is_dir() and (path / "config.json").is_file():  # an export or any transformers folder
            return self._load_folder(path, name or path.name, str(path))
        from gemcut.models.resolve import resolve_model

        return self._load_folder(resolve_model(source), name or source, source)

    @staticmethod
    def _labels_file(path: Path | str) -> list[str] | None:
        f = Path(path) / "labels.json"
        if not f.is_file():
            return None
        data = json.loads(f.read_text(encoding="utf-8"))
        return list(data["labels"] if isinstance(data, dict) else data)

    def _load_folder(self, path: Path | str, name: str, source: str) -> ServedModel:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        # The folder's own Python runs only when the person serving it said so (never left to a prompt).
        trust = self.settings.trust_remote_code
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        archs = cfg.architectures or []
        classify = any(a.endswith("ForSequenceClassification") for a in archs)
        if not classify and archs and all(a.endswith(("Model", "ForMaskedLM")) and not a.endswith("LMHeadModel") for a in archs):
            return self._load_encoder(path, name, source)
        cls = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
        # safetensors only: a pickled checkpoint could run code when loaded
        model = cls.from_pretrained(path, dtype=torch.float32 if self.device.type == "cpu" else "auto", use_safetensors=True,
                                    trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        return self._plain(model, tokenizer, name, source, self._labels_file(path))

    def _load_encoder(self, path: Path | str, name: str, source: str) -> ServedModel:
        """A plain encoder folder, for /v1/embeddings: pooled as its checkpoint says (sentence-transformers'
        modules.json, or a recorded classifier_pooling), else by the mean of its tokens."""
        from transformers import AutoModel, AutoTokenizer

        from gemcut.models.pooling import checkpoint_pooling

        trust = self.settings.trust_remote_code
        model = AutoModel.from_pretrained(path, dtype=torch.float32 if self.device.type == "cpu" else "auto", use_safetensors=True,
                                          trust_remote_code=trust).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        return ServedModel(name, "embed", model, tokenizer, None, _context_length(model, tokenizer), source=source,
                           pooling=checkpoint_pooling(model, path) or "mean")

    def _plain(self, model, tokenizer, name: str, source: str, labels: list[str] | None) -> ServedModel:
        model = model.to(self.device).eval()
        classify = type(model).__name__.endswith("ForSequenceClassification")
        if classify:
            from gemcut.models.pooling import prepare_classifier

            prepare_classifier(model, "auto", source)  # a gemcut export records its pooling in config.json
        if classify and labels is None:
            id2label = getattr(model.config, "id2label", None) or {}
            labels = [id2label[i] for i in sorted(id2label)] or None
        template = None
        if not classify:
            from gemcut.data.templates import TEMPLATE_JSON, ChatTemplate

            src = Path(source)
            try:
                # An export carries the run's template.json; any other folder uses the tokenizer's own template.
                template = ChatTemplate.load(src, tokenizer) if (src / TEMPLATE_JSON).is_file() else ChatTemplate.from_tokenizer(tokenizer)
            except GemcutError:
                log.warning("%s: the tokenizer has no chat template; /v1/chat/completions is refused, /v1/completions works", name)
        return ServedModel(name, "classify" if classify else "causal_lm", model, tokenizer, template,
                           _context_length(model, tokenizer), labels=labels, source=source, pooling=_pooling(model) if classify else None)

    def _load_run(self, run_dir: Path, name: str | None) -> ServedModel:
        from peft import PeftModel

        from gemcut.models.load import load_run

        name = name or run_dir.name
        loaded = load_run(run_dir, trust_remote_code=self.settings.trust_remote_code)
        task = "classify" if loaded.task in ("classify", "reward") or type(loaded.model).__name__.endswith("ForSequenceClassification") \
            else "causal_lm"
        template, tokenizer = loaded.template, loaded.tokenizer
        labels = list(loaded.labels) if loaded.labels else None
        model, adapter = loaded.model, None
        if isinstance(model, PeftModel) and task == "causal_lm":
            shared = self._groups.get(loaded.base_name)
            final_dir = run_dir / "final"
            if shared is None:
                # Rename the adapter to the served name so that later runs cannot collide with "default".
                old = model.active_adapter
                if old != name:
                    model.load_adapter(str(final_dir), adapter_name=name)
                    model.set_adapter(name)
                    model.delete_adapter(old)
                shared = model.to(self.device).eval()
                self._groups[loaded.base_name] = shared
                base_path = loaded.meta.get("base_path")
                if base_path:
                    self._groups[str(Path(base_path).resolve())] = shared
            else:
                # This run's own copy of the base is dropped when `loaded` goes; the shared base serves it.
                shared.load_adapter(str(final_dir), adapter_name=name)
            model, adapter = shared, name
        else:
            model = model.to(self.device).eval()
            if isinstance(model, PeftModel):  # e.g. a LoRA classifier: its own adapter, not shared
                adapter = model.active_adapter
        return ServedModel(name, task, model, tokenizer, template if task == "causal_lm" else None,
                           _context_length(model, tokenizer), adapter=adapter, labels=labels, source=str(run_dir),
                           pooling=_pooling(model) if task == "classify" else None)

    # ------------------------------------------------------------------ queue

    def depth(self) -> int:
        return self.queue.qsize() + (1 if self._held is not None else 0)

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; raises a 429 APIError when the queue is full (the client should retry later)."""
        if self._thread is None or not self._thread.is_alive():
            raise APIError(503, "the model worker is not running", type="server_error", code="worker_stopped")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self.settings.max_queue} requests are already waiting; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self.depth())
        return job.future

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
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
            job = self._held or self._take(0)
            self._held = None
            if job is None:
                break
            self._fail(job, APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))

    def _take(self, timeout: float) -> Job | None:
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _next_batch(self) -> list[Job]:
        first, self._held = self._held, None
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
                self._held = job  # first in line for the next batch: arrival order is kept
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
            job.loop.call_soon_threadsafe(job.stream.put_nowait, _DONE)
        if not job.future.done():
            job.future.set_exception(err)

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
        i = 0
        for job in batch:
            job.future.set_result(results[i:i + job.size()])
            i += job.size()

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
        job.loop.call_soon_threadsafe(job.stream.put_nowait, _DONE)
        job.future.set_result({"completion_tokens": tokens, "finish_reasons": finishes})

    def _classify(self, batch: list[ClassifyJob]) -> None:
        served = batch[0].served
        texts = [t for job in batch for t in job.texts]
        enc = served.tokenizer(texts, padding=True, truncation=True, max_length=served.context_length, return_tensors="pt").to(self.device)
        logits = served.model(**enc).logits.float()
        probs = torch.softmax(logits, dim=-1).cpu().tolist()
        self.metrics.batch_size.observe(len(texts))
        i = 0
        for job in batch:
            job.future.set_result(probs[i:i + job.size()])
            i += job.size()

    def _embed(self, batch: list[EmbedJob]) -> None:
        """L2-normalised pooled last hidden states (the served model's pooling), one list of floats per input."""
        served = batch[0].served
        inputs = [ids for job in batch for ids in job.inputs]
        width = max(map(len, inputs))
        pad = served.tokenizer.pad_token_id if served.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(inputs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for i, row in enumerate(inputs):  # right padding, as encoders are trained
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if served.task == "classify":
            # The classifier's encoder with gemcut's pooling installed (gemcut/models/pooling.py) hands over the
            # pooled vector where the head reads the first token, for cls and mean alike.
            inner = served.model.get_base_model() if hasattr(served.model, "get_base_model") else served.model
            pooled = getattr(inner, inner.base_model_prefix)(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        else:
            from gemcut.models.padding_free import masked_mean

            hidden = served.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = hidden[:, 0] if served.pooling == "cls" else masked_mean(hidden, mask.bool())
        vectors = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        self.metrics.batch_size.observe(len(inputs))
        i = 0
        for job in batch:
            job.future.set_result(vectors[i:i + job.size()])
            i += job.size()

    def _count_tokens(self, name: str, tokens: int, seconds: float, batch: int) -> None:
        self.metrics.generated_tokens.labels(model=name).inc(tokens)
        self.metrics.batch_size.observe(batch)
        if seconds > 0:
            self.metrics.tokens_per_second.labels(model=name).set(tokens / seconds)
