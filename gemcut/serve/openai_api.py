"""OpenAI-compatible routes: GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/classify.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    client.chat.completions.create(model="my-run", messages=[{"role": "user", "content": "hi"}], stream=True)

Bodies are validated by pydantic; the error handlers (gemcut/serve/errors.py) turn every failure into
OpenAI's error shape with a 4xx. Every number is range-checked here, so nothing a client sends can make
torch raise later: seeds are 64-bit, temperatures under MIN_TEMPERATURE are greedy. Prompts are rendered
with the run's own chat template (the one used in training) and checked against the context length
before they reach the queue; rendering, tokenising and logging run in worker threads, never on the event
loop. Each answered request is logged (gemcut/serve/store.py) and counted (gemcut/serve/metrics.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from gemcut.errors import GemcutError
from gemcut.serve.engine import _DONE, ClassifyJob, GenJob, ServedModel
from gemcut.serve.errors import APIError, invalid
from gemcut.serve.limits import UnicodeChecked

router = APIRouter(prefix="/v1")

# Below this a temperature is taken as 0 (greedy): dividing float32 logits by it would overflow to inf,
# and sampling at it picks the argmax anyway.
MIN_TEMPERATURE = 1e-4
INT64 = 2**63


class _Body(BaseModel):
    # Unknown fields (user, logit_bias, ...) are accepted and ignored, as clients send them by default.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


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


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="One prompt string (a list is accepted with one element).")
    echo: bool = False


class ClassifyRequest(UnicodeChecked, _Body):
    model: str
    input: str | list[str] = Field(description="Text or list of texts to classify.")


# ---------------------------------------------------------------------------- helpers


def _engine(request: Request):
    return request.app.state.engine


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _check_sampling(body: _Sampling, served: ServedModel, prompt_len: int, settings) -> int:
    """Validate n and the token budget against the context; returns max_new_tokens."""
    if served.task != "causal_lm":
        raise invalid(f"{served.name!r} is a classifier; use POST /v1/classify", param="model", code="wrong_endpoint")
    if body.n > settings.max_n:
        raise invalid(f"n={body.n} is more than this server allows ({settings.max_n})", param="n", code="invalid_value")
    ctx = served.context_length
    budget = body.budget()
    if prompt_len >= ctx or (budget is not None and prompt_len + budget > ctx):
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + (budget or 0)} tokens ({prompt_len} in the prompt, {budget or 0} in the completion). "
                            "Please reduce the length of the messages or completion.", param="messages", code="context_length_exceeded")
    return budget if budget is not None else min(settings.default_max_tokens, ctx - prompt_len)


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


@router.get("/models")
def list_models(request: Request) -> dict:
    models = _engine(request).models.values()
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": m.created, "owned_by": "gemcut",
         "task": m.task, "context_length": m.context_length, **({"labels": m.labels} if m.labels else {})}
        for m in models]}


@router.get("/models/{name}")
def get_model(name: str, request: Request) -> dict:
    m = _engine(request).get(name)
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "gemcut", "task": m.task, "context_length": m.context_length}


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    started = time.perf_counter()
    engine = _engine(request)
    served = engine.get(body.model)
    if served.task == "causal_lm" and served.template is None:
        raise invalid(f"{served.name!r} has no chat template; use POST /v1/completions with a plain prompt", param="model")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
    prompt_ids = await run_in_threadpool(_chat_prompt_ids, served, messages) if served.template is not None else []
    max_new = _check_sampling(body, served, len(prompt_ids), request.app.state.settings)
    return await _respond(request, body, served, prompt_ids, max_new, started, "chat", messages,
                          prompt_chars=sum(len(m["content"]) for m in messages))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    started = time.perf_counter()
    engine = _engine(request)
    served = engine.get(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise invalid(f"send one prompt per request (got {len(prompts)}); batching happens on the server", param="prompt")
    if not prompts[0]:
        raise invalid("prompt is empty", param="prompt")
    prompt_ids = await run_in_threadpool(_token_ids, served, prompts[0]) if served.task == "causal_lm" else []
    max_new = _check_sampling(body, served, len(prompt_ids), request.app.state.settings)
    if not prompt_ids:
        raise invalid("the prompt has no tokens for this model's tokenizer", param="prompt")
    return await _respond(request, body, served, prompt_ids, max_new, started, "completions", prompts[0], prompt_chars=len(prompts[0]))


async def _respond(request: Request, body: _Sampling, served: ServedModel, prompt_ids: list[int], max_new: int, started: float,
                   endpoint: str, prompt_obj, prompt_chars: int):
    engine = _engine(request)
    chat = endpoint == "chat"
    response_id = _new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    job = GenJob(served, prompts=[prompt_ids] * body.n, max_new_tokens=max_new, temperature=body.temperature,
                 top_p=body.top_p, seed=body.seed, stop=body.stop)
    log_args = dict(response_id=response_id, endpoint=endpoint, served_name=served.name, started=started, prompt_chars=prompt_chars,
                    prompt_tokens=len(prompt_ids), n=body.n, stream=body.stream, prompt_obj=prompt_obj)
    if body.stream:
        job.loop, job.stream = asyncio.get_running_loop(), asyncio.Queue()
        engine.submit(job)  # raises 429 before any byte is sent
        return StreamingResponse(_sse(request, job, response_id, created, chat, log_args), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results = await _await(engine.submit(job))
    completion_tokens = sum(len(r.token_ids) for r in results)
    queue_ms = (job.started - job.enqueued) * 1000
    await run_in_threadpool(_record, request, completion_tokens=completion_tokens, queue_ms=queue_ms, response_text=results[0].text,
                            **log_args)
    usage = _usage(len(prompt_ids), completion_tokens)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(results)]
        return {"id": response_id, "object": "chat.completion", "created": created, "model": served.name,
                "choices": choices, "usage": usage, "system_fingerprint": None}
    prefix = prompt_obj if getattr(body, "echo", False) else ""
    choices = [{"index": i, "text": prefix + r.text, "finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(results)]
    return {"id": response_id, "object": "text_completion", "created": created, "model": served.name, "choices": choices, "usage": usage}


def _sse_event(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _sse(request: Request, job: GenJob, response_id: str, created: int, chat: bool, log_args: dict):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    name = job.served.name
    texts: dict[int, list[str]] = {}
    tokens = 0

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": response_id, "object": obj, "created": created, "model": name, "choices": [choice]}

    status, error_type = 200, None
    try:
        started_choices: set[int] = set()
        while True:
            item = await job.stream.get()
            if item is _DONE:
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
            if delta.text or delta.finish_reason:
                yield _sse_event(chunk(index, delta.text, delta.finish_reason))
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
    engine = _engine(request)
    served = engine.get(body.model)
    if served.task != "classify":
        raise invalid(f"{served.name!r} is a generative model; /v1/classify needs a classifier run", param="model", code="wrong_endpoint")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise invalid("input must be a non-empty string or a list of non-empty strings", param="input")
    if len(texts) > request.app.state.settings.max_batch * 8:
        raise invalid(f"at most {request.app.state.settings.max_batch * 8} texts per request", param="input")
    n_tokens = sum(map(len, await run_in_threadpool(lambda: served.tokenizer(texts)["input_ids"])))
    job = ClassifyJob(served, texts=texts)
    probs = await _await(engine.submit(job))
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
