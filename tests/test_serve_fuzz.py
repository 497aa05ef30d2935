"""Fuzz of the server's request models: whatever body a client POSTs, the answer is a 2xx or a 4xx in OpenAI's
error shape, never a 500.

    python -m pytest -q tests/test_serve_fuzz.py

Bodies are arbitrary JSON (lone surrogates, NaN, 2**70 and deep nesting included), valid requests with a
few fields replaced, dropped or added, and raw bytes cut or spoiled. The app runs in-process (TestClient)
with the tiny models of tests/tiny.py, so valid requests really generate, stream and classify; budgets are
capped (max_tokens at most 6, n at most 2) to keep it quick.
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from serve_runs import API_KEY, classifier, plain_model

from gemcut.serve.app import create_app
from gemcut.serve.settings import ServeSettings

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/feedback", "/v1/embeddings"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
WORDS = ["tiny-chat", "tiny-clf", "", "user", "assistant", "system", "developer", "text", "image_url", "up", "down", "hello world",
         "<|im_start|>", "<|im_end|>", "\x00", "\n\n"]
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), st.sampled_from(SURROGATES), st.text(max_size=4)),
)
NUMBER = st.one_of(
    st.integers(-8, 8),
    st.sampled_from([2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**70, -(2**70), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 5e-324, -0.0, 0.5, 1.0, 2.0, 2.0000001, 1e308]),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=16)

# Every key a request model knows, so mutations hit real fields, not only ignored ones.
KEYS = ["model", "messages", "prompt", "input", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "seed", "stop",
        "stream", "echo", "response_id", "rating", "comment", "choice_index", "user", "logit_bias", "presence_penalty",
        "frequency_penalty", "logprobs", "top_logprobs", "response_format", "stream_options", "tools", "store", "metadata",
        "service_tier", "encoding_format", "dimensions"]
# Budgets stay small (or invalid, or huge: a 400) so that a valid request never generates for long.
BUDGET = st.one_of(st.integers(-2, 6), st.sampled_from([2**63, 10**30, 0.5, "4", None, True]), TEXT)


def _message():
    content = st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=2))
    return st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": content})


SCHEMA = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}}, "required": ["a"]},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, {"type": "string", "maxLength": 3}, {"type": "null"},
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "a+"}}}, {"anyOf": [{"type": "string"}]}, {"type": "nope"},
    {"type": "integer", "minimum": 5, "maximum": 1}, {"type": "object", "required": "a"},
])
RESPONSE_FORMAT = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}}]),
    st.builds(lambda schema, strict: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": strict}},
              st.one_of(SCHEMA, JSON), st.booleans()),
)
SAMPLING = {"temperature": st.one_of(st.just(0), st.floats(0, 2)), "top_p": st.floats(0.01, 1), "max_tokens": st.integers(1, 6),
            "n": st.integers(1, 2), "seed": st.integers(-(2**63), 2**63 - 1), "stop": st.lists(st.sampled_from(["a", "o", "\n"]), max_size=2),
            "stream": st.booleans(), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
            "logit_bias": st.dictionaries(st.one_of(st.integers(-2, 400).map(str), TEXT), st.floats(-100, 100), max_size=3),
            "response_format": RESPONSE_FORMAT, "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
            "user": TEXT, "store": st.booleans(), "metadata": st.dictionaries(TEXT, TEXT, max_size=2),
            "tools": st.lists(st.just({"type": "function", "function": {"name": "f"}}), max_size=1)}


def _valid(route: str, response_id: str):
    if route == "/v1/chat/completions":
        return st.fixed_dictionaries({"model": st.just("tiny-chat"), "messages": st.lists(_message(), min_size=1, max_size=3)},
                                     optional={**SAMPLING, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 21)})
    if route == "/v1/completions":
        return st.fixed_dictionaries({"model": st.just("tiny-chat"), "prompt": st.text(min_size=1, max_size=40)},
                                     optional={**SAMPLING, "echo": st.booleans(), "logprobs": st.integers(0, 21)})
    if route == "/v1/classify":
        return st.fixed_dictionaries({"model": st.just("tiny-clf"),
                                      "input": st.one_of(st.text(min_size=1, max_size=30), st.lists(st.text(min_size=1, max_size=30),
                                                                                                   min_size=1, max_size=3))})
    if route == "/v1/embeddings":
        text = st.text(min_size=1, max_size=30)
        return st.fixed_dictionaries({"model": st.sampled_from(["tiny-clf", "tiny-chat"]),
                                      "input": st.one_of(text, st.lists(text, min_size=1, max_size=3), st.lists(st.integers(-1, 400), max_size=5),
                                                         st.lists(st.lists(st.integers(0, 383), min_size=1, max_size=4), max_size=2))},
                                     optional={"encoding_format": st.sampled_from(["float", "base64", "int8"]),
                                               "dimensions": st.sampled_from([32, 16, 0])})
    return st.fixed_dictionaries({"response_id": st.just(response_id), "rating": st.sampled_from(["up", "down", 1, -1])},
                                 optional={"comment": st.text(max_size=30), "choice_index": st.integers(0, 3)})


@st.composite
def _mutated(draw, route: str, response_id: str) -> dict:
    body = dict(draw(_valid(route, response_id)))
    for _ in range(draw(st.integers(0, 3))):  # 0: the valid body itself, which must generate
        key = draw(st.sampled_from(KEYS))
        op = draw(st.sampled_from(["set", "drop", "message"]))
        if op == "drop":
            body.pop(key, None)
        elif op == "message" and isinstance(body.get("messages"), list) and body["messages"]:
            i = draw(st.integers(0, len(body["messages"]) - 1))
            message = body["messages"][i] if isinstance(body["messages"][i], dict) else {}
            body["messages"][i] = {**message, draw(st.sampled_from(["role", "content", "name"])): draw(JSON)}
        else:
            body[key] = draw(BUDGET if key in ("max_tokens", "max_completion_tokens") else JSON)
    return body


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fuzz")
    app = create_app(ServeSettings(models=[str(plain_model(tmp / "tiny-chat")), str(classifier(tmp / "tiny-clf"))], api_keys=[API_KEY],
                                   db_url=f"sqlite:///{tmp / 'serve.db'}", default_max_tokens=4, max_n=2, log_prompts=True))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post("/v1/completions", headers=AUTH, json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200
        c.response_id = r.json()["id"]  # a logged response, so that feedback bodies can succeed
        yield c


def _post(client, route: str, content: bytes, fuzzing: bool = True):
    r = client.post(route, headers=AUTH, content=content)
    if fuzzing:
        event(f"{route} {r.status_code}")  # --hypothesis-show-statistics: how many bodies got through to the model
    assert r.status_code < 500, (route, content[:300], r.status_code, r.text[:500])
    if r.status_code < 300:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n") and "server_error" not in r.text, r.text[-500:]
        else:
            assert isinstance(r.json(), dict)
        return r
    assert 400 <= r.status_code < 500
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")), err
    return r


def _encode(body) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates go as \ud800 escapes; NaN and Infinity as Python writes them


@FUZZ
@given(route=st.sampled_from(ROUTES), body=JSON)
def test_any_json_body_gives_2xx_or_an_openai_4xx(client, route, body):
    _post(client, route, _encode(body))


@FUZZ
@given(data=st.data(), route=st.sampled_from(ROUTES))
def test_mutated_valid_bodies_give_2xx_or_an_openai_4xx(client, data, route):
    _post(client, route, _encode(data.draw(_mutated(route, client.response_id))))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), route=st.sampled_from(ROUTES))
def test_spoiled_bytes_give_an_openai_4xx(client, data, route):
    raw = _encode(data.draw(_valid(route, client.response_id)))
    at = data.draw(st.integers(0, len(raw)))
    spoiled = data.draw(st.sampled_from([raw[:at], raw[:at] + data.draw(st.binary(min_size=1, max_size=3)) + raw[at:]]))
    _post(client, route, spoiled)


def test_valid_bodies_do_generate(client):
    """The strategies above are not all refusals: the valid bodies reach the model."""
    r = _post(client, "/v1/chat/completions", _encode({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": -(2**63)}), fuzzing=False)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
