"""OpenAI-compatible routes: GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/classify.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    client.chat.completions.create(model="my-run", messages=[{"role": "user", "content": "hi"}], stream=True)

Bodies are validated by pydantic; the error handlers (gemcut/serve/errors.py) turn every failure into
OpenAI's error shape with a 4xx. Every number is range-checked here, so nothing a client sends can make
torch raise later: seeds are 64-bit, temperatures under MIN_TEMPERATURE are greedy. Prompts are rendered
with the run's own chat template (the one used in training) and checked against the context length
before they reach the queue; rendering, tokenising and logging run in worker threads, never on the event
loop. Each answered request is logged (gemcut/serve/store.py) and counted (gemcut/serve/metrics.py).

OpenAI parameters the server does not honour (tools, audio, ...: UNSUPPORTED) are a 400
`unsupported_parameter` naming the parameter, never silently dropped; a null value counts as absent.
Fields OpenAI does not define are ignored, as clients add their own (docs/serving.md has the table).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from gemcut.errors import GemcutError
from gemcut.generation import MAX_TOP_LOGPROBS, TokenLogprob
from gemcut.serve.auth import principal_of
from gemcut.serve.errors import APIError, invalid
from gemcut.serve.limits import UnicodeChecked
from gemcut.serve.registry import ServedModel
from gemcut.serve.structured import Vocabulary, json_grammar, token_text
from gemcut.serve.worker import STREAM_END, ClassifyJob, EmbedJob, GenJob

router = APIRouter(prefix="/v1")

# Below this a temperature is taken as 0 (greedy): dividing float32 logits by it would overflow to inf,
# and sampling at it picks the argmax anyway.
MIN_TEMPERATURE = 1e-4
INT64 = 2**63


class _Body(BaseModel):
    # Fields OpenAI does not define are accepted and ignored (clients add their own); OpenAI's own fields that
    # are not honoured are refused by name (UNSUPPORTED).
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# OpenAI parameter -> why it is refused (and the fix, where there is one). `None` is always accepted.
UNSUPPORTED = {
    "tools": "tool calling is not supported; describe the tools in the messages, or use response_format json_schema for structured output",
    "tool_choice": "tool calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "functions": "function calling is not supported; use response_format json_schema for structured output",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "served models are not reasoning models",
    "verbosity": "verbosity is not supported",
}
# Accepted when harmless, refused otherwise: parameter -> values that change nothing here.
HARMLESS = {"store": (False,), "service_tier": ("auto", "default"), "modalities": (["text"],)}


def _refuse_unsupported(data: Any, unsupported: dict[str, str]) -> None:
    if not isinstance(data, dict):
        return
    for name, reason in unsupported.items():
        if data.get(name) is not None:
            raise APIError(400, f"{name}: {reason}", param=name, code="unsupported_parameter")
    for name, fine in HARMLESS.items():
        value = data.get(name)
        if value is not None and value not in fine:
            raise APIError(400, f"{name}={json.dumps(value)[:60]} is not supported; omit it or send {json.dumps(fine[0])}",
                           param=name, code="unsupported_parameter")


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="A last chunk (empty choices) carries the usage.")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self, index: int) -> str:
        """The message's text; `index` is its place in `messages`, for errors."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"content part of type {part.get('type')!r} is not supported; only text parts are",
                              param=f"messages[{index}].content[{i}]", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)


class _Sampling(UnicodeChecked, _Body):
    model: str = Field(description="A name from GET /v1/models.")
    temperature: float = Field(1.0, ge=0, le=2, description=f"0 is greedy (and so is anything under {MIN_TEMPERATURE}).")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; wins when both are given.")
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1, description="A 64-bit integer; the same seed gives the same sample.")
    stop: str | list[str] | None = Field(None, validate_default=True, description="Up to 4 strings that end a completion.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted once from the logit of every token already generated.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from a token's logit per time it was generated.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100] added to its logit.")
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema (constrained decoding).")
    user: str | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v):
        for key, value in (v or {}).items():
            if not -100 <= value <= 100:
                raise ValueError(f"bias of token {key} is {value}; biases are in [-100, 100]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in v):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("temperature")
    @classmethod
    def _vanishing_is_greedy(cls, v: float) -> float:
        return 0.0 if v < MIN_TEMPERATURE else v

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_k(self) -> int | None:
        """How many alternatives per token to report; None: no logprobs."""
        raise NotImplementedError


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(False, description="Report each generated token's logprob (the model's own distribution).")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: the k most likely tokens at each step.")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        _refuse_unsupported(data, UNSUPPORTED)
        return data

    def top_logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="One prompt string (a list is accepted with one element).")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Report each token's logprob and the k most likely tokens.")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        _refuse_unsupported(data, {**UNSUPPORTED, "suffix": "suffix (insertion) is not supported",
                                   "best_of": "best_of is not supported; use n and pick on the client"})
        return data

    def top_logprobs_k(self) -> int | None:
        if self.logprobs is not None and self.echo:
            raise invalid("logprobs with echo (the prompt's logprobs) is not supported; drop echo", param="logprobs",
                          code="unsupported_parameter")
        return self.logprobs


class EmbeddingRequest(UnicodeChecked, _Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(description="A text, texts, token ids, or lists of token ids.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's hidden size (vectors are not truncated).")
    user: str | None = None


class ClassifyRequest(UnicodeChecked, _Body):
    model: str
    input: str | list[str] = Field(description="Text or list of texts to classify.")


# ---------------------------------------------------------------------------- helpers


def _served(request: Request, name: str | None) -> ServedModel:
    return request.app.state.registry.get(name, principal_of(request))


def _worker(request: Request):
    return request.app.state.worker


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _check_sampling(body: _Sampling, served: ServedModel, prompt_len: int, settings) -> int:
    """Validate n and the token budget against the context; returns max_new_tokens."""
    if served.classifies:
        raise invalid(f"{served.name!r} is a classifier; use POST /v1/classify (or /v1/embeddings)", param="model", code="wrong_endpoint")
    if not served.generates:
        raise invalid(f"{served.name!r} is an encoder; use POST /v1/embeddings", param="model", code="wrong_endpoint")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options is only allowed with stream: true", param="stream_options", code="invalid_value")
    if body.n > settings.max_n:
        raise invalid(f"n={body.n} is more than this server allows ({settings.max_n})", param="n", code="invalid_value")
    ctx = served.context_length
    budget = body.budget()
    if prompt_len >= ctx or (budget is not None and prompt_len + budget > ctx):
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + (budget or 0)} tokens ({prompt_len} in the prompt, {budget or 0} in the completion). "
                            "Please reduce the length of the messages or completion.", param="messages", code="context_length_exceeded")
    return budget if budget is not None else min(settings.default_max_tokens, ctx - prompt_len)


def _logit_bias(body: _Sampling, served: ServedModel) -> dict[int, float]:
    """logit_bias with integer token ids, each checked against the vocabulary."""
    size = Vocabulary.of(served).vocab_size if body.logit_bias else 0
    out: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if not 0 <= token_id < size:
            raise invalid(f"logit_bias: {key!r} is not a token id of this model (0 to {size - 1})", param="logit_bias", code="invalid_value")
        out[token_id] = value
    return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


async def _await(future) -> Any:
    return await asyncio.wrap_future(future)


def _chat_prompt_ids(served: ServedModel, messages: list[dict]) -> list[int]:
    """The chat template's token ids for `messages` (CPU work: call it in a thread)."""
    if len(messages) > served.context_length:  # each message takes at least one token: refuse before rendering them all
        raise APIError(400, f"{len(messages)} messages cannot fit this model's maximum context length of {served.context_length} "
                            "tokens; send fewer", param="messages", code="context_length_exceeded")
    try:
        return list(served.template.prompt_ids(messages))
    except (GemcutError, TemplateError) as e:  # the template's own checks, e.g. roles that must alternate
        raise invalid(f"the model's chat template refuses these messages: {e}", param="messages", code="invalid_messages") from None


def _token_ids(served: ServedModel, text: str) -> list[int]:
    """The tokenizer's ids for `text` (CPU work: call it in a thread)."""
    return list(served.tokenizer(text)["input_ids"])


def _record(request: Request, *, response_id: str, endpoint: str, served_name: str, started: float, prompt_chars: int,
            prompt_tokens: int, completion_tokens: int, n: int, queue_ms: float, stream: bool, prompt_obj, response_text: str | None,
            status: int = 200, error_type: str | None = None) -> None:
    """Count the request in the metrics and write its log row (text only when log_prompts is on)."""
    app = request.app
    latency = time.perf_counter() - started
    app.state.metrics.requests.labels(model=served_name, endpoint=endpoint, status=str(status)).inc()
    app.state.metrics.latency.labels(model=served_name, endpoint=endpoint).observe(latency)
    app.state.metrics.prompt_tokens.labels(model=served_name).inc(prompt_tokens)
    keep = app.state.settings.log_prompts
    app.state.store.log_request(
        response_id=response_id, endpoint=endpoint, model=served_name, status=status, error_type=error_type,
        prompt_chars=prompt_chars, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, n=n,
        latency_ms=latency * 1000, queue_ms=queue_ms, stream=int(stream),
        prompt_text=json.dumps(prompt_obj, ensure_ascii=False) if keep else None,
        response_text=response_text if keep else None)


# ---------------------------------------------------------------------------- routes


def _model_object(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": m.owner or "gemcut",
            "task": m.kind, "context_length": m.context_length, **({"labels": m.labels} if m.labels else {})}


@router.get("/models")
def list_models(request: Request) -> dict:
    registry = request.app.state.registry
    principal = principal_of(request)
    listed = [_model_object(m) for m in registry.visible(principal)]
    lister = getattr(request.app.state, "model_lister", None)  # models that load on first call (the service's)
    if lister is not None:
        loaded = {m["id"] for m in listed}
        listed += [m for m in lister(principal) if m["id"] not in loaded]
    return {"object": "list", "data": listed}


@router.get("/models/{name}")
def get_model(name: str, request: Request) -> dict:
    return _model_object(_served(request, name))


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    started = time.perf_counter()
    served = _served(request, body.model)
    if served.generates and served.template is None:
        raise invalid(f"{served.name!r} has no chat template; use POST /v1/completions with a plain prompt", param="model")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
    prompt_ids = await run_in_threadpool(_chat_prompt_ids, served, messages) if served.template is not None else []
    max_new = _check_sampling(body, served, len(prompt_ids), request.app.state.settings)
    return await _respond(request, body, served, prompt_ids, max_new, started, "chat", messages,
                          prompt_chars=sum(len(m["content"]) for m in messages))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    started = time.perf_counter()
    served = _served(request, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise invalid(f"send one prompt per request (got {len(prompts)}); batching happens on the server", param="prompt")
    if not prompts[0]:
        raise invalid("prompt is empty", param="prompt")
    prompt_ids = await run_in_threadpool(_token_ids, served, prompts[0]) if served.generates else []
    max_new = _check_sampling(body, served, len(prompt_ids), request.app.state.settings)
    if not prompt_ids:
        raise invalid("the prompt has no tokens for this model's tokenizer", param="prompt")
    return await _respond(request, body, served, prompt_ids, max_new, started, "completions", prompts[0], prompt_chars=len(prompts[0]))


async def _respond(request: Request, body: _Sampling, served: ServedModel, prompt_ids: list[int], max_new: int, started: float,
                   endpoint: str, prompt_obj, prompt_chars: int):
    worker = _worker(request)
    chat = endpoint == "chat"
    response_id = _new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    job = GenJob(served, prompts=[prompt_ids] * body.n, max_new_tokens=max_new, temperature=body.temperature,
                 top_p=body.top_p, seed=body.seed, stop=body.stop, presence_penalty=body.presence_penalty,
                 frequency_penalty=body.frequency_penalty, logprobs=body.top_logprobs_k())
    # Building the vocabulary (first use) and compiling a schema are CPU work: not on the event loop.
    job.logit_bias = await run_in_threadpool(_logit_bias, body, served)
    job.grammar = await run_in_threadpool(json_grammar, body.response_format)
    if job.grammar is not None or job.logprobs is not None:
        await run_in_threadpool(Vocabulary.of, served)
    log_args = dict(response_id=response_id, endpoint=endpoint, served_name=served.name, started=started, prompt_chars=prompt_chars,
                    prompt_tokens=len(prompt_ids), n=body.n, stream=body.stream, prompt_obj=prompt_obj)
    if body.stream:
        job.loop, job.stream = asyncio.get_running_loop(), asyncio.Queue()
        worker.submit(job)  # raises 429 before any byte is sent
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(request, job, response_id, created, chat, log_args, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results = await _await(worker.submit(job))
    completion_tokens = sum(len(r.token_ids) for r in results)
    queue_ms = (job.started - job.enqueued) * 1000
    await run_in_threadpool(_record, request, completion_tokens=completion_tokens, queue_ms=queue_ms, response_text=results[0].text,
                            **log_args)
    usage = _usage(len(prompt_ids), completion_tokens)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": _chat_logprobs(served, r.logprobs)} for i, r in enumerate(results)]
        return {"id": response_id, "object": "chat.completion", "created": created, "model": served.name,
                "choices": choices, "usage": usage, "system_fingerprint": None}
    prefix = prompt_obj if getattr(body, "echo", False) else ""
    choices = [{"index": i, "text": prefix + r.text, "finish_reason": r.finish_reason,
                "logprobs": _completion_logprobs(served, r.logprobs, len(prompt_obj))} for i, r in enumerate(results)]
    return {"id": response_id, "object": "text_completion", "created": created, "model": served.name, "choices": choices, "usage": usage}


def _token_entry(vocab: Vocabulary, token_id: int, logprob: float) -> dict:
    raw = vocab.token_bytes(token_id)
    return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}


def _chat_logprobs(served: ServedModel, logprobs: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's ChoiceLogprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}."""
    if logprobs is None:
        return None
    vocab = Vocabulary.of(served)
    content = [_token_entry(vocab, lp.token_id, lp.logprob) | {"top_logprobs": [_token_entry(vocab, t, v) for t, v in lp.top]}
               for lp in logprobs]
    return {"content": content, "refusal": None}


def _completion_logprobs(served: ServedModel, logprobs: list[TokenLogprob] | None, offset: int) -> dict | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset
    (each token's start, counted from the prompt's start, the prompt included)."""
    if logprobs is None:
        return None
    vocab = Vocabulary.of(served)
    tokens = [token_text(vocab.token_bytes(lp.token_id)) for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "text_offset": offsets,
            "top_logprobs": [{token_text(vocab.token_bytes(t)): v for t, v in lp.top} for lp in logprobs]}


def _sse_event(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _sse(request: Request, job: GenJob, response_id: str, created: int, chat: bool, log_args: dict, include_usage: bool = False):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; with `include_usage`, every
    chunk has `usage: null` and a last one before [DONE] has empty choices and the usage."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    name = job.served.name
    texts: dict[int, list[str]] = {}
    offsets: dict[int, int] = {}  # completions' text_offset: where the next token starts
    tokens = 0

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False, logprobs=None) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            lp = None if logprobs is None else {"content": _chat_logprobs(job.served, logprobs)["content"], "refusal": None}
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
        else:
            lp = None
            if logprobs is not None:
                lp = _completion_logprobs(job.served, logprobs, offsets.get(index, log_args["prompt_chars"]))
                if lp["tokens"]:
                    offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": lp}
        out = {"id": response_id, "object": obj, "created": created, "model": name, "choices": [choice]}
        return out | ({"usage": None} if include_usage else {})

    status, error_type = 200, None
    try:
        started_choices: set[int] = set()
        while True:
            item = await job.stream.get()
            if item is STREAM_END:
                break
            if isinstance(item, APIError):
                status, error_type = item.status, item.type
                request.app.state.metrics.record_error(item.status, item.type)
                yield _sse_event(item.body())
                continue
            index, delta = item
            tokens += len(delta.token_ids)
            if index not in started_choices and chat:
                started_choices.add(index)
                yield _sse_event(chunk(index, None, None, first=True))
            texts.setdefault(index, []).append(delta.text)
            if delta.text or delta.finish_reason or delta.logprobs:
                yield _sse_event(chunk(index, delta.text, delta.finish_reason, logprobs=delta.logprobs))
        if include_usage and status == 200:
            yield _sse_event({"id": response_id, "object": obj, "created": created, "model": name, "choices": [],
                              "usage": _usage(log_args["prompt_tokens"], tokens)})
        yield b"data: [DONE]\n\n"
    finally:
        # Runs on normal end and when the client disconnects: stop the worker and log what was sent.
        job.cancelled = True
        queue_ms = (job.started - job.enqueued) * 1000 if job.started else 0.0
        _record(request, completion_tokens=tokens, queue_ms=queue_ms, response_text="".join(texts.get(0, [])),
                status=status, error_type=error_type, **log_args)


@router.post("/classify")
async def classify(body: ClassifyRequest, request: Request) -> dict:
    """Label and per-label probabilities for each input text (classifier runs only)."""
    started = time.perf_counter()
    served = _served(request, body.model)
    if not served.classifies:
        raise invalid(f"{served.name!r} is not a classifier; /v1/classify needs a classifier run", param="model", code="wrong_endpoint")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise invalid("input must be a non-empty string or a list of non-empty strings", param="input")
    if len(texts) > request.app.state.settings.max_batch * 8:
        raise invalid(f"at most {request.app.state.settings.max_batch * 8} texts per request", param="input")
    n_tokens = sum(map(len, await run_in_threadpool(lambda: served.tokenizer(texts)["input_ids"])))
    job = ClassifyJob(served, texts=texts)
    await run_in_threadpool(job.token_ids)  # the rows the model reads (cut to the context), off the worker thread
    probs = await _await(_worker(request).submit(job))
    labels = served.labels or [str(i) for i in range(len(probs[0]))]
    data = []
    for i, row in enumerate(probs):
        best = max(range(len(row)), key=row.__getitem__)
        data.append({"index": i, "label": labels[best], "probabilities": dict(zip(labels, row))})
    response_id = _new_id("clf")
    await run_in_threadpool(_record, request, response_id=response_id, endpoint="classify", served_name=served.name, started=started,
                            prompt_chars=sum(map(len, texts)), prompt_tokens=n_tokens, completion_tokens=0, n=len(texts),
                            queue_ms=(job.started - job.enqueued) * 1000, stream=False, prompt_obj=texts,
                            response_text=json.dumps([d["label"] for d in data]))
    return {"id": response_id, "object": "list", "model": served.name, "data": data, "usage": _usage(n_tokens, 0)}


def _embedding_inputs(served: ServedModel, given) -> list[list[int]]:
    """Token ids of each input (texts are tokenised; id lists are checked against the vocabulary and the context)."""
    bad = invalid("input must be a non-empty string, a list of non-empty strings, a list of token ids, or a list of such lists",
                  param="input")
    if isinstance(given, str):
        given = [given]
    if not given:
        raise bad
    if all(isinstance(x, int) for x in given):
        given = [given]
    vocab = len(served.tokenizer)
    out = []
    for x in given:
        if isinstance(x, str) and x:
            ids = list(served.tokenizer(x, truncation=False)["input_ids"])
        elif isinstance(x, list) and x and all(isinstance(t, int) for t in x):
            if not all(0 <= t < vocab for t in x):
                raise invalid(f"input holds token ids outside this model's vocabulary (0 to {vocab - 1})", param="input")
            ids = list(x)
        else:
            raise bad
        if not ids or len(ids) > served.context_length:
            raise APIError(400, f"an input of {len(ids)} tokens does not fit this model's context of {served.context_length} tokens",
                           param="input", code="context_length_exceeded")
        out.append(ids)
    return out


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    """The run's pooled last hidden state of each input, L2-normalised (encoder runs and classifiers only)."""
    started = time.perf_counter()
    served = _served(request, body.model)
    if served.pooling is None:
        raise invalid(f"{served.name!r} is not an encoder run; embeddings need an encoder (a BERT-like classifier or encoder folder)",
                      param="model", code="wrong_endpoint")
    settings = request.app.state.settings
    inputs = await run_in_threadpool(_embedding_inputs, served, body.input)
    if len(inputs) > settings.max_batch * 8:
        raise invalid(f"at most {settings.max_batch * 8} inputs per request", param="input")
    width = served.model.config.hidden_size
    if body.dimensions is not None and body.dimensions != width:
        raise invalid(f"dimensions={body.dimensions}: this model's embeddings have {width} dimensions and are not truncated; "
                      "omit dimensions or send it", param="dimensions", code="invalid_value")
    job = EmbedJob(served, inputs=inputs)
    vectors = await _await(_worker(request).submit(job))
    if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    n_tokens = sum(map(len, inputs))
    response_id = _new_id("emb")
    await run_in_threadpool(_record, request, response_id=response_id, endpoint="embeddings", served_name=served.name, started=started,
                            prompt_chars=sum(len(x) for x in ([body.input] if isinstance(body.input, str) else body.input) if isinstance(x, str)),
                            prompt_tokens=n_tokens, completion_tokens=0, n=len(inputs), queue_ms=(job.started - job.enqueued) * 1000,
                            stream=False, prompt_obj=body.input, response_text=None)
    return {"object": "list", "model": served.name, "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
