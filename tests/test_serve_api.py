"""The OpenAI-compatible API against a real uvicorn server on loopback, with the official `openai` client.

    python -m pytest -q tests/test_serve_api.py
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from serve_runs import API_KEY, classifier, plain_model, running

from gemcut.serve.app import create_app
from gemcut.serve.settings import ServeSettings

MSG = [{"role": "user", "content": "what is the capital of france?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("serve")
    lm = plain_model(tmp / "tiny-chat")
    clf = classifier(tmp / "tiny-clf")
    settings = ServeSettings(models=[str(lm), str(clf)], api_keys=[API_KEY], db_url=f"sqlite:///{tmp / 'serve.db'}",
                             default_max_tokens=12, max_n=4, log_prompts=True)
    app = create_app(settings)
    with running(app) as url:
        yield {"url": url, "app": app, "client": openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)}


def chat(client, **kw):
    kw.setdefault("model", "tiny-chat")
    kw.setdefault("messages", MSG)
    kw.setdefault("max_tokens", 10)
    return client.chat.completions.create(**kw)


def test_models_list(server):
    models = {m.id for m in server["client"].models.list()}
    assert models == {"tiny-chat", "tiny-clf"}


def test_chat_greedy_shape_usage_and_log(server):
    r = chat(server["client"], temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny-chat" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 5
    again = chat(server["client"], temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content  # greedy is deterministic
    row = server["app"].state.store.get_request(r.id)
    assert row.model == "tiny-chat" and row.prompt_tokens == r.usage.prompt_tokens
    assert row.completion_tokens == r.usage.completion_tokens and row.latency_ms > 0
    assert json.loads(row.prompt_text) == MSG and row.response_text == r.choices[0].message.content


def test_streaming_equals_non_streaming(server):
    full = chat(server["client"], temperature=0, max_tokens=12)
    stream = chat(server["client"], temperature=0, max_tokens=12, stream=True)
    pieces, finish, roles = [], None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.model == "tiny-chat"
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        pieces.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert roles[0] == "assistant"
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert len(pieces) > 2  # it really came in pieces


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(server):
    a = chat(server["client"], temperature=1.0, seed=7, n=3, max_tokens=8)
    b = chat(server["client"], temperature=1.0, seed=7, n=3, max_tokens=8)
    c = chat(server["client"], temperature=1.0, seed=8, n=3, max_tokens=8)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # the n samples differ from each other


def test_stop_sequence_cuts_the_text(server):
    full = chat(server["client"], temperature=0, max_tokens=12).choices[0].message.content
    assert len(full) >= 4
    stop = full[2:4]
    cut = chat(server["client"], temperature=0, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_completions_endpoint(server):
    r = server["client"].completions.create(model="tiny-chat", prompt="the quick brown fox", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens <= 6


def test_classify(server):
    r = httpx.post(server["url"] + "/v1/classify", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "tiny-clf", "input": ["i love this product", "i hate waiting"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    for d in data:
        assert set(d["probabilities"]) == {"negative", "neutral", "positive"}
        assert abs(sum(d["probabilities"].values()) - 1) < 1e-5
        assert d["label"] == max(d["probabilities"], key=d["probabilities"].get)
    # chat on a classifier, classify on a generator: both refused with 400
    with pytest.raises(openai.BadRequestError):
        chat(server["client"], model="tiny-clf")
    r = httpx.post(server["url"] + "/v1/classify", headers={"Authorization": f"Bearer {API_KEY}"}, json={"model": "tiny-chat", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"


def _assert_openai_error(resp: httpx.Response, status: int, code: str | None = None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code


def test_errors_have_openai_shape_and_server_keeps_serving(server):
    client, url = server["client"], server["url"]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    _assert_openai_error(httpx.post(url + "/v1/chat/completions", headers=headers, content=b'{"model": "tiny-chat", "messages": [}'),
                         400, "invalid_json")
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model="no-such-model")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=[{"role": "user", "content": "hello world " * 200}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=250)  # prompt + completion beyond the 256-token context
    assert e.value.code == "context_length_exceeded"
    for bad in ({"temperature": 5}, {"top_p": 0}, {"max_tokens": 0}, {"n": 99}, {"stop": ["a", "b", "c", "d", "e"]}):
        with pytest.raises(openai.BadRequestError):
            chat(client, **bad)
    _assert_openai_error(httpx.post(url + "/v1/chat/completions", headers=headers, json={"model": "tiny-chat", "messages": []}), 400)
    _assert_openai_error(httpx.post(url + "/v1/chat/completions", headers=headers,
                                    json={"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]}), 400)
    _assert_openai_error(httpx.post(url + "/v1/chat/completions", headers=headers, json={"messages": MSG}), 400)
    assert chat(client, temperature=0).choices[0].message.content is not None  # still serving


def test_feedback_and_metrics(server):
    client, url = server["client"], server["url"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = chat(client, temperature=0)
    ok = httpx.post(url + "/v1/feedback", headers=headers, json={"response_id": r.id, "rating": "up", "comment": "good"})
    assert ok.status_code == 200 and ok.json()["response_id"] == r.id
    _assert_openai_error(httpx.post(url + "/v1/feedback", headers=headers, json={"response_id": "chatcmpl-nope", "rating": "up"}),
                         404, "response_not_found")
    _assert_openai_error(httpx.post(url + "/v1/feedback", headers=headers, json={"response_id": r.id, "rating": "meh"}), 400)
    stats = server["app"].state.store.feedback_stats()
    assert stats.up >= 1 and stats.with_feedback >= 1
    metrics = httpx.get(url + "/metrics", headers=headers).text
    for name in ("gemcut_requests_total", "gemcut_request_latency_seconds_bucket", "gemcut_generated_tokens_total",
                 "gemcut_generation_tokens_per_second", "gemcut_errors_total", "gemcut_queue_depth"):
        assert name in metrics
    assert 'status="200"' in metrics and 'model="tiny-chat"' in metrics
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
