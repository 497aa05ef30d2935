"""Hostile input and faults against a real uvicorn server on loopback: oversized bodies (413), a big prompt
that must not stall other clients, text that is not Unicode, out-of-range numbers, and faults of ours
(500 without internals, the connection still usable).

    python -m pytest -q tests/test_serve_hostile.py
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import socket
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlparse

import httpx
import pytest
import torch
from jinja2 import TemplateError
from serve_runs import API_KEY, classifier, plain_model, running
from typer.testing import CliRunner

from gemcut.errors import GemcutError
from gemcut.serve.app import create_app
from gemcut.serve.settings import ServeSettings

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
LIMIT = 256 * 1024
MSG = [{"role": "user", "content": "hello world"}]


def _error(message: str, param: str | None, code: str | None, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("hostile")
    return tmp, plain_model(tmp / "tiny-chat"), classifier(tmp / "tiny-clf")


@pytest.fixture(scope="module")
def server(models):
    tmp, lm, clf = models
    settings = ServeSettings(models=[str(lm), str(clf)], api_keys=[API_KEY], db_url=f"sqlite:///{tmp / 'serve.db'}", default_max_tokens=4)
    app = create_app(settings)
    with running(app) as url:
        yield {"url": url, "app": app}


@pytest.fixture(scope="module")
def limited(models):
    """A server with a small body limit, so that oversized bodies stay cheap to send."""
    tmp, lm, _ = models
    app = create_app(ServeSettings(models=[str(lm)], api_keys=[API_KEY], db_url=f"sqlite:///{tmp / 'limited.db'}", max_body_bytes=LIMIT))
    with running(app) as url:
        yield {"url": url, "app": app}


class Connection:
    """One keep-alive HTTP/1.1 connection (http.client never reconnects behind our back while it is open)."""

    def __init__(self, url: str):
        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        self.conn.connect()
        self.local = self.conn.sock.getsockname()

    def post(self, path: str, body: dict | bytes) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \ud800
        self.conn.request("POST", path, body=data, headers=AUTH)
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def get(self, path: str) -> tuple[int, dict]:
        self.conn.request("GET", path, headers=AUTH)
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def same_socket(self) -> bool:
        return self.conn.sock is not None and self.conn.sock.getsockname() == self.local

    def close(self):
        self.conn.close()


# ---------------------------------------------------------------------------- item 8: body size, event loop


def _too_large(size: int | None) -> dict:
    given = f"is {size} bytes, more than" if size is not None else "is more than"
    return _error(f"the request body {given} this server accepts ({LIMIT} bytes); send less, or start the server with a "
                  "larger --max-body-bytes (max_body_bytes in a settings file)", None, "request_too_large")


def test_body_over_the_limit_is_refused_from_its_content_length_before_it_is_read(limited):
    u = urlparse(limited["url"])
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        # Headers only: the 50 MB body is never sent, so an answer proves the server did not wait for it.
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n".encode())
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 413
        assert json.loads(resp.read(int(resp.getheader("content-length")))) == _too_large(50_000_000)
    metrics = limited["app"].state.metrics.render()[0].decode()
    assert 'gemcut_errors_total{status="413",type="invalid_request_error"}' in metrics


def test_chunked_body_over_the_limit_is_refused_while_streaming(limited):
    sent = []

    def chunks():
        for _ in range(2 * LIMIT // 4096):
            sent.append(4096)
            yield b"x" * 4096

    r = httpx.post(limited["url"] + "/v1/chat/completions", headers=AUTH, content=chunks(), timeout=30)  # no Content-Length
    assert r.status_code == 413 and r.json() == _too_large(None)
    # also without a key: the limit holds before authentication
    r = httpx.post(limited["url"] + "/v1/completions", content=b"x" * (LIMIT + 1), timeout=30)
    assert r.status_code == 413 and r.json() == _too_large(LIMIT + 1)


def test_body_at_the_limit_is_read_as_usual(limited):
    prompt = "hello world " * 10
    body = json.dumps({"model": "tiny-chat", "prompt": prompt, "max_tokens": 2, "temperature": 0, "user": ""}).encode()
    body = body[:-2] + b" " * (LIMIT - len(body)) + body[-2:]  # pad with JSON whitespace to exactly the limit
    assert len(body) == LIMIT
    r = httpx.post(limited["url"] + "/v1/completions", headers=AUTH, content=body, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(limited["url"] + "/health").status_code == 200


def test_default_limit_and_the_serve_flag(monkeypatch, models):
    assert ServeSettings().max_body_bytes == 8 * 1024 * 1024
    import uvicorn

    import gemcut.service.app
    from gemcut.cli import app, register_commands

    seen = {}

    def fake_create_service_app(settings):
        seen["settings"] = settings
        return SimpleNamespace(state=SimpleNamespace(registry=SimpleNamespace(models={"tiny": None})))

    monkeypatch.setattr(gemcut.service.app, "create_service_app", fake_create_service_app)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    register_commands()
    result = CliRunner().invoke(app, ["serve", "--model", str(models[1]), "--api-key", "k", "--max-body-bytes", "65536",
                                      "--service-root", str(models[1].parent / "service")])
    assert result.exit_code == 0, result.output
    assert seen["settings"].max_body_bytes == 65536


class _Gated:
    """A template or tokenizer that, once called, waits until the test lets it go on (or 5 s pass)."""

    def __init__(self, real, method: str):
        self.real, self.method = real, method
        self.called, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        if name == self.method:
            return self._gated(getattr(self.real, name))
        return getattr(self.real, name)

    def __call__(self, *args, **kwargs):
        return self._gated(self.real)(*args, **kwargs)

    def _gated(self, fn):
        def run(*args, **kwargs):
            self.called.set()
            self.release.wait(5)
            return fn(*args, **kwargs)
        return run


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_health_answers_while_a_big_prompt_is_tokenised(server, monkeypatch, route):
    served = server["app"].state.registry.models["tiny-chat"]
    big = "the quick brown fox jumps over the lazy dog. " * 20_000  # 900 kB: far beyond the 256-token context
    if route == "chat":
        gate = _Gated(served.template, "prompt_ids")
        monkeypatch.setattr(served, "template", gate)
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": big}]}
    else:
        gate = _Gated(served.tokenizer, "__call__")
        monkeypatch.setattr(served, "tokenizer", gate)
        body = {"model": "tiny-chat", "prompt": big}
    url = server["url"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big_request = pool.submit(httpx.post, f"{url}/v1/{'chat/' if route == 'chat' else ''}completions", headers=AUTH, json=body,
                                  timeout=60)
        assert gate.called.wait(20), "the big prompt never reached tokenisation"
        t0 = time.perf_counter()
        health = httpx.get(url + "/health", timeout=30)
        health_s = time.perf_counter() - t0
        big_still_running = not big_request.done()
        gate.release.set()
        answer = big_request.result(timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert big_still_running, f"/health took {health_s:.2f} s: it waited for the big prompt's tokenisation"
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"


# ---------------------------------------------------------------------------- item 9: input that gave a 500


SURROGATE = "hello \ud800 world"


def _surrogate_error(param: str) -> dict:
    return _error(f"{param}: the text holds a lone UTF-16 surrogate (\\ud800 at character 6), which is not valid Unicode; "
                  "send valid UTF-8, with surrogates only in pairs", param, "invalid_unicode")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": MSG + [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages[1].content[0].text"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": MSG, "stop": ["a", SURROGATE]}, "stop[1]"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": SURROGATE}, "prompt"),
    ("/v1/classify", {"model": "tiny-clf", "input": ["fine", SURROGATE]}, "input[1]"),
    ("/v1/feedback", {"response_id": "chatcmpl-x", "rating": "up", "comment": SURROGATE}, "comment"),
])
def test_lone_surrogate_is_a_400_naming_the_parameter_and_the_connection_stays_usable(server, path, body, param):
    conn = Connection(server["url"])
    try:
        assert conn.post(path, body) == (400, _surrogate_error(param))
        status, models = conn.get("/v1/models")  # the next request on the same keep-alive connection
        assert status == 200 and {m["id"] for m in models["data"]} == {"tiny-chat", "tiny-clf"}
        assert conn.same_socket()
    finally:
        conn.close()


def test_raw_bytes_that_are_not_utf8_are_400s(server):
    conn = Connection(server["url"])
    try:
        # A surrogate encoded as UTF-8 bytes: Python's JSON decoder lets it through as a lone surrogate.
        body = b'{"model": "tiny-chat", "prompt": "hello \xed\xa0\x80 world"}'
        assert conn.post("/v1/completions", body) == (400, _surrogate_error("prompt"))
        body = b'{"model": "tiny-chat", "prompt": "hello \xff world"}'
        at = body.index(b"\xff")
        assert conn.post("/v1/completions", body) == (400, _error(f"the request body is not valid JSON text (invalid start byte at byte {at}); "
                                                                  "send UTF-8", None, "invalid_json"))
        assert conn.get("/v1/models")[0] == 200 and conn.same_socket()
    finally:
        conn.close()


@pytest.mark.parametrize("seed", [2**70, -(2**70), 2**63])
def test_seed_outside_what_torch_accepts_is_a_400_naming_seed(server, seed):
    body = {"model": "tiny-chat", "messages": MSG, "max_tokens": 2, "temperature": 1.0, "seed": seed}
    r = httpx.post(server["url"] + "/v1/chat/completions", headers=AUTH, json=body)
    bound = "less than or equal to 9223372036854775807" if seed > 0 else "greater than or equal to -9223372036854775808"
    assert (r.status_code, r.json()) == (400, _error(f"seed: Input should be {bound} (given: {seed})", "seed", "invalid_value"))


def test_seeds_at_the_int64_bounds_work(server):
    for seed in (2**63 - 1, -(2**63)):
        body = {"model": "tiny-chat", "messages": MSG, "max_tokens": 2, "temperature": 1.0, "seed": seed, "n": 2, "stream": True}
        r = httpx.post(server["url"] + "/v1/chat/completions", headers=AUTH, json=body)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text


def test_a_vanishing_temperature_is_greedy(server):
    greedy = httpx.post(server["url"] + "/v1/completions", headers=AUTH,
                        json={"model": "tiny-chat", "prompt": "hello world", "max_tokens": 5, "temperature": 0})
    tiny = httpx.post(server["url"] + "/v1/completions", headers=AUTH,
                      json={"model": "tiny-chat", "prompt": "hello world", "max_tokens": 5, "temperature": 1e-300})
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_huge_numbers_are_400s(server):
    url = server["url"]
    r = httpx.post(url + "/v1/feedback", headers=AUTH, json={"response_id": "chatcmpl-x", "rating": "up", "choice_index": 2**70})
    assert (r.status_code, r.json()) == (400, _error(f"choice_index: Input should be less than or equal to 1023 (given: {2**70})",
                                                     "choice_index", "invalid_value"))
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"model": "tiny-chat", "messages": MSG, "n": 2**70})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"model": "tiny-chat", "messages": MSG, "max_tokens": 2**70})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_a_validation_error_names_the_nested_parameter(server):
    r = httpx.post(server["url"] + "/v1/chat/completions", headers=AUTH,
                   json={"model": "tiny-chat", "messages": MSG + [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role"


def test_more_messages_than_context_tokens_are_refused_before_rendering(server, monkeypatch):
    served = server["app"].state.registry.models["tiny-chat"]
    monkeypatch.setattr(served, "template", _Refusing(GemcutError("rendered")))  # rendering would give another 400
    r = httpx.post(server["url"] + "/v1/chat/completions", headers=AUTH, json={"model": "tiny-chat", "messages": MSG * 257})
    assert (r.status_code, r.json()) == (400, _error("257 messages cannot fit this model's maximum context length of 256 tokens; "
                                                     "send fewer", "messages", "context_length_exceeded"))


def test_a_template_that_refuses_the_messages_is_a_400(server, monkeypatch):
    served = server["app"].state.registry.models["tiny-chat"]
    monkeypatch.setattr(served, "template", _Refusing(TemplateError("Conversation roles must alternate user/assistant")))
    r = httpx.post(server["url"] + "/v1/chat/completions", headers=AUTH, json={"model": "tiny-chat", "messages": MSG * 2})
    assert (r.status_code, r.json()) == (400, _error("the model's chat template refuses these messages: Conversation roles must "
                                                     "alternate user/assistant", "messages", "invalid_messages"))


class _Refusing:
    def __init__(self, error: Exception):
        self.error = error

    def prompt_ids(self, messages):
        raise self.error


# ---------------------------------------------------------------------------- faults of ours: 500 without internals

SECRET = "/srv/secret/path.py line 7: KeyError 'internal'"


def test_an_unexpected_exception_is_a_generic_500_logged_and_the_connection_stays_usable(server, monkeypatch, caplog):
    served = server["app"].state.registry.models["tiny-chat"]

    class Broken:
        def prompt_ids(self, messages):
            raise RuntimeError(SECRET)

    monkeypatch.setattr(served, "template", Broken())
    conn = Connection(server["url"])
    try:
        with caplog.at_level(logging.ERROR, logger="gemcut.serve"):
            status, body = conn.post("/v1/chat/completions", {"model": "tiny-chat", "messages": MSG})
        assert (status, body) == (500, _error("the server failed to answer this request; the details are in its log", None,
                                              "internal_error", type="server_error"))
        assert SECRET in caplog.text and "Traceback" in caplog.text  # the details are in the log, not the body
        monkeypatch.undo()
        assert conn.post("/v1/chat/completions", {"model": "tiny-chat", "messages": MSG, "max_tokens": 2})[0] == 200
        assert conn.same_socket()
    finally:
        conn.close()


def test_a_failing_model_call_is_a_500_without_internals(server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError(SECRET)

    # The model itself fails (whichever code of the worker calls it).
    monkeypatch.setattr(server["app"].state.registry.models["tiny-chat"].model, "forward", broken)
    with caplog.at_level(logging.ERROR, logger="gemcut.serve"):
        r = httpx.post(server["url"] + "/v1/completions", headers=AUTH, json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 2})
    assert (r.status_code, r.json()) == (500, _error("the model call failed; the details are in the server's log", None, "model_error",
                                                     type="server_error"))
    assert SECRET in caplog.text
