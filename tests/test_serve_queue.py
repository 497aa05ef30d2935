"""Concurrency: a full queue answers 429 in OpenAI's shape and the server recovers; queued greedy requests
are batched into one generate call and give the same text as alone.

    python -m pytest -q tests/test_serve_queue.py
"""

from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest
import torch
from serve_runs import API_KEY, plain_model, running

from gemcut.serve.app import create_app
from gemcut.serve.settings import ServeSettings


def _wait(cond, timeout=20.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return plain_model(tmp_path_factory.mktemp("queue") / "tiny")


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _ask(client, text, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=6, temperature=0, **kw)


def test_full_queue_answers_429_and_recovers(model_dir, tmp_path):
    app = create_app(ServeSettings(models=[str(model_dir)], api_keys=[API_KEY], db_url=f"sqlite:///{tmp_path / 'db'}",
                                   max_queue=1, max_batch=1, batch_wait_ms=0))
    worker = app.state.worker
    with running(app) as url, concurrent.futures.ThreadPoolExecutor(4) as pool:
        client = _client(url)
        worker.lock.acquire()  # the worker blocks on its first batch, as if busy with a long generation
        try:
            first = pool.submit(_ask, client, "hello")
            _wait(lambda: worker.queue.qsize() == 0 and worker.held is None and first.running())
            time.sleep(0.2)  # the worker has taken request 1 and waits for the lock
            second = pool.submit(_ask, client, "hello world")
            _wait(lambda: worker.queue.qsize() == 1)  # request 2 fills the queue (max_queue=1)
            with pytest.raises(openai.RateLimitError) as e:
                _ask(client, "one too many")
            assert e.value.status_code == 429 and e.value.code == "queue_full"
            assert e.value.response.headers.get("retry-after") == "1"
        finally:
            worker.lock.release()
        assert first.result(timeout=60).choices[0].message.content is not None
        assert second.result(timeout=60).choices[0].message.content is not None
        assert _ask(client, "after").choices[0].finish_reason in ("stop", "length")  # serving again
        metrics = app.state.metrics.render()[0].decode()
        assert 'gemcut_errors_total{status="429",type="rate_limit_error"} 1.0' in metrics


def test_queued_requests_are_batched_and_match_single_results(model_dir, tmp_path):
    app = create_app(ServeSettings(models=[str(model_dir)], api_keys=[API_KEY], db_url=f"sqlite:///{tmp_path / 'db'}",
                                   max_queue=16, max_batch=8, batch_wait_ms=50))
    worker = app.state.worker
    prompts = ["hello world", "the quick brown fox", "what is the capital of france?", "i love this product", "the weather"]
    with running(app) as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        client = _client(url)
        alone = [_ask(client, p).choices[0].message.content for p in prompts]
        worker.lock.acquire()
        try:
            blocker = pool.submit(_ask, client, "blocker")
            _wait(lambda: worker.queue.qsize() == 0 and blocker.running())
            time.sleep(0.2)
            futures = [pool.submit(_ask, client, p) for p in prompts]
            _wait(lambda: worker.depth() == len(prompts))
        finally:
            worker.lock.release()
        together = [f.result(timeout=60).choices[0].message.content for f in futures]
        blocker.result(timeout=60)
    assert together == alone  # batched greedy decoding equals one-by-one
    sizes = app.state.metrics.batch_size.collect()[0].samples
    total = next(s.value for s in sizes if s.name == "gemcut_batch_size_sum")
    count = next(s.value for s in sizes if s.name == "gemcut_batch_size_count")
    assert total - count > 0  # at least one batch held more than one sequence
