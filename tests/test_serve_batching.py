"""Continuous batching in the serve worker: requests that arrive while others decode join them at the next
step and still get exactly their one-by-one greedy output; streams and n > 1 decode in the same batch
(choice i seeded seed + i, so a stream equals the non-streamed answer); adapters on one base never share
a step; time to first token and inter-token latency reach /metrics; classifier inputs split into forward
passes by the token budget.

    python -m pytest -q tests/test_serve_batching.py
"""

from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest
import torch
from serve_runs import API_KEY, classifier, lora_run, plain_model, running

from gemcut.generation import generate
from gemcut.serve.app import create_app
from gemcut.serve.metrics import Metrics
from gemcut.serve.registry import ModelRegistry
from gemcut.serve.settings import ServeSettings
from gemcut.serve.worker import ClassifyJob, GenJob, Worker, token_budget_passes


def _wait(cond, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("batching")


@pytest.fixture(scope="module")
def chat_model(tmp):
    return plain_model(tmp / "tiny")


@pytest.fixture(scope="module")
def sharp_model(tmp):
    """The tiny Llama with sharp attention: at its random initialisation attention is nearly uniform, so
    positions hardly change its logits; scaled queries and keys make a wrong position or mask show."""
    from transformers import AutoModelForCausalLM

    path = plain_model(tmp / "sharp")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    model.save_pretrained(path)
    return path


def _steps_with_at_least(metrics: Metrics, rows: int) -> float:
    """How many decode steps ran with `rows` sequences or more (from the batch-size histogram)."""
    samples = metrics.batch_size.collect()[0].samples
    count = next(s.value for s in samples if s.name == "gemcut_batch_size_count")
    below = max((s.value for s in samples if s.name == "gemcut_batch_size_bucket" and float(s.labels["le"]) < rows), default=0.0)
    return count - below


def test_requests_joining_mid_batch_give_their_one_by_one_greedy_output(sharp_model):
    registry = ModelRegistry(ServeSettings(device="cpu"))
    served = registry.add(str(sharp_model))
    template = served.template
    # Different lengths (left padding on both sides of a join), the same ChatML header (a shared prefix), budgets
    # that end at different steps (rows leave while others go on).
    conversations = [("the quick brown fox jumps over the lazy dog and runs far away", 40), ("hi", 12),
                     ("what is the capital of france? tell me", 25), ("i love this product", 8), ("ok", 30)]
    system = {"role": "system", "content": "you are a helpful assistant: answer the question briefly."}
    prompts = [list(template.prompt_ids([system, {"role": "user", "content": text}])) for text, _ in conversations]
    eos = served.eos_ids()
    # logprobs=0: each token's log-probability, which shows the logits themselves match, not only their argmax.
    alone = [generate(served.model, served.tokenizer, [p], max_new_tokens=n, eos_ids=eos, logprobs=0)[0]
             for p, (_, n) in zip(prompts, conversations)]
    assert len(alone[0].token_ids) >= 20, "the first request must still decode when the others join"

    metrics = Metrics()
    worker = Worker(ServeSettings(max_batch=8, batch_wait_ms=0), metrics, registry.lock)
    worker.start()
    try:
        jobs = [GenJob(served, prompts=[p], max_new_tokens=n, logprobs=0) for p, (_, n) in zip(prompts, conversations)]
        first = worker.submit(jobs[0])
        _wait(lambda: jobs[0].first_token_at > 0)  # the first is decoding
        with worker.lock:  # the worker pauses between two steps
            assert not first.done()
            later = [worker.submit(job) for job in jobs[1:4]]
        _wait(lambda: jobs[1].first_token_at > 0)
        with worker.lock:
            last = worker.submit(jobs[4])  # arrives while the others decode and some have left
        results = [f.result(timeout=60)[0] for f in [first, *later, last]]
    finally:
        worker.stop()
    for got, want in zip(results, alone):
        assert got.token_ids == want.token_ids and got.text == want.text and got.finish_reason == want.finish_reason
        torch.testing.assert_close([lp.logprob for lp in got.logprobs], [lp.logprob for lp in want.logprobs], atol=1e-5, rtol=1e-5)
    assert _steps_with_at_least(metrics, 3) > 0  # they did decode together
    assert worker.decoding() == 0 and worker.active.cache is None  # finished rows left, their cache with them
    assert len(worker.active.prefix[0]) >= 16  # the template's header and system prompt ran once, then were shared


def test_streams_and_n_choices_join_the_running_batch(chat_model, tmp):
    app = create_app(ServeSettings(models=[str(chat_model)], api_keys=[API_KEY], db_url=f"sqlite:///{tmp / 'db'}", max_batch=8,
                                   max_n=4, batch_wait_ms=0))
    served = app.state.registry.get("tiny")
    messages = [{"role": "user", "content": "tell me a story"}]
    prompt = list(served.template.prompt_ids(messages))
    with running(app) as url, concurrent.futures.ThreadPoolExecutor(4) as pool:
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

        def ask(**kw):
            return client.chat.completions.create(model="tiny", messages=messages, **kw)

        def streamed(**kw):
            texts: dict[int, str] = {}
            for chunk in ask(stream=True, **kw):
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            return [texts[i] for i in sorted(texts)]

        background = pool.submit(ask, max_tokens=60, temperature=0)  # decoding while the others arrive
        _wait(lambda: app.state.worker.decoding() > 0)
        sampled = pool.submit(ask, max_tokens=20, temperature=1.0, seed=11, n=3)
        stream = pool.submit(streamed, max_tokens=20, temperature=1.0, seed=11, n=3)
        greedy_stream = pool.submit(streamed, max_tokens=20, temperature=0)
        sampled_texts = [c.message.content for c in sampled.result(timeout=60).choices]
        assert stream.result(timeout=60) == sampled_texts  # a stream equals the non-streamed answer, n > 1 too
        assert greedy_stream.result(timeout=60) == [ask(max_tokens=20, temperature=0).choices[0].message.content]
        background.result(timeout=60)
        metrics = app.state.metrics.render()[0].decode()
    # Choice i samples with a generator seeded seed + i: what `generate` gives with those seeds.
    want = generate(served.model, served.tokenizer, [prompt] * 3, max_new_tokens=20, temperature=1.0, seed=[11, 12, 13],
                    eos_ids=served.eos_ids())
    assert sampled_texts == [r.text for r in want]
    assert len(set(sampled_texts)) > 1
    assert 'gemcut_time_to_first_token_seconds_count{model="tiny"}' in metrics
    assert 'gemcut_inter_token_latency_seconds_count{model="tiny"}' in metrics
    assert _steps_with_at_least(app.state.metrics, 4) > 0  # the background request, the 3 choices (and the streams) together


def test_adapters_on_one_base_decode_in_turn_each_as_alone(tmp):
    base = plain_model(tmp / "base")
    runs = [lora_run(tmp / "run-a", base, seed=1), lora_run(tmp / "run-b", base, seed=2)]
    registry = ModelRegistry(ServeSettings(device="cpu"))
    served = [registry.add(str(run)) for run in runs] + [registry.add(str(base), "base")]
    assert served[0].model is served[1].model is served[2].model
    prompt = list(served[0].template.prompt_ids([{"role": "user", "content": "the quick brown fox"}]))
    alone = []
    for s in served:
        with s.activate():
            alone.append(generate(s.model, s.tokenizer, [prompt], max_new_tokens=15, eos_ids=s.eos_ids())[0].token_ids)
    assert len({tuple(a) for a in alone}) == 3  # the adapters change the answer
    worker = Worker(ServeSettings(max_batch=8, batch_wait_ms=0), Metrics(), registry.lock)
    worker.start()
    try:
        with worker.lock:  # all queued at once: one model decodes at a time, in arrival order
            futures = [worker.submit(GenJob(s, prompts=[prompt], max_new_tokens=15)) for s in served + served]
        got = [f.result(timeout=60)[0].token_ids for f in futures]
    finally:
        worker.stop()
    assert got == alone + alone


def test_token_budget_passes():
    assert token_budget_passes([5, 1, 3, 2], budget=6) == [[1, 3], [2], [0]]  # shortest first; with row 2, 3 rows x 3 tokens = 9
    assert token_budget_passes([10, 2], budget=4) == [[1], [0]]  # a row over the budget runs alone
    assert token_budget_passes([2, 2, 2], budget=100) == [[0, 1, 2]]


def test_classifier_inputs_split_by_the_token_budget_give_the_same_probabilities(tmp):
    registry = ModelRegistry(ServeSettings(device="cpu"))
    served = registry.add(str(classifier(tmp / "clf")))
    texts = ["i love this product", "i hate waiting in lines all day long", "ok", "the weather is nice today"]
    answers = {}
    for budget in (10_000, 16):
        metrics = Metrics()
        worker = Worker(ServeSettings(max_batch_tokens=budget, batch_wait_ms=50), metrics, registry.lock)
        worker.start()
        try:
            with worker.lock:  # two requests queued together run together
                futures = [worker.submit(ClassifyJob(served, texts=texts[:2])), worker.submit(ClassifyJob(served, texts=texts[2:]))]
            answers[budget] = [p for f in futures for p in f.result(timeout=60)]
        finally:
            worker.stop()
        passes = metrics.batch_size.collect()[0].samples
        answers[budget, "passes"] = next(s.value for s in passes if s.name == "gemcut_batch_size_count")
    assert answers[10_000, "passes"] == 1  # both requests in one forward pass
    assert answers[16, "passes"] >= 3  # 16 tokens hold at most two short rows, one long one
    torch.testing.assert_close(torch.tensor(answers[16]), torch.tensor(answers[10_000]), atol=1e-5, rtol=1e-4)


def test_a_sliding_window_model_decodes_requests_in_turn_each_as_alone():
    """A cache whose layers slide cannot take rows: the next request starts when the running ones finish."""
    from tiny import tiny_tokenizer
    from transformers import MistralConfig, MistralForCausalLM

    from gemcut.serve.registry import ServedModel
    from gemcut.tasks import task_named

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                             sliding_window=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    served = ServedModel("sliding", task_named("causal_lm"), model, tok, None, 256)
    prompts = [tok("the quick brown fox jumps over the lazy dog")["input_ids"], tok("hello world")["input_ids"]]
    alone = [generate(model, tok, [p], max_new_tokens=12, eos_ids=served.eos_ids())[0].token_ids for p in prompts]
    # Slowed (12 steps take a quarter second or more), so on a fast machine the first is still decoding when the second arrives.
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    metrics = Metrics()
    worker = Worker(ServeSettings(max_batch=8, batch_wait_ms=0), metrics)
    worker.start()
    try:
        jobs = [GenJob(served, prompts=[p], max_new_tokens=12) for p in prompts]
        futures = [worker.submit(jobs[0])]
        _wait(lambda: jobs[0].first_token_at > 0)
        with worker.lock:  # arrives while the first decodes
            assert not futures[0].done()
            futures.append(worker.submit(jobs[1]))
        got = [f.result(timeout=60)[0].token_ids for f in futures]
    finally:
        worker.stop()
    assert got == alone
    assert worker.batches["sliding"].joinable is False and _steps_with_at_least(metrics, 2) == 0


def test_a_stream_whose_client_goes_away_leaves_the_batch(chat_model, tmp):
    import httpx

    app = create_app(ServeSettings(models=[str(chat_model)], api_keys=[API_KEY], db_url=f"sqlite:///{tmp / 'db-gone'}", batch_wait_ms=0))
    worker, metrics = app.state.worker, app.state.metrics
    served = app.state.registry.get("tiny")
    served.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))  # 240 tokens take seconds
    never_end = {str(e): -100 for e in served.eos_ids()}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 240, "temperature": 0, "stream": True, "logit_bias": never_end}

    def answered() -> float:
        return sum(s.value for s in metrics.requests.collect()[0].samples if s.name == "gemcut_requests_total")

    with running(app) as url, httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection at once
            next(lines)
            worker.lock.acquire()  # the worker pauses between two steps
        try:
            _wait(lambda: answered() == 1)  # the server saw the client go and logged the request
            assert worker.decoding() == 1
        finally:
            worker.lock.release()
        _wait(lambda: worker.decoding() == 0)
    generated = next(s.value for s in metrics.generated_tokens.collect()[0].samples if s.name == "gemcut_generated_tokens_total")
    assert 0 < generated < 240  # it stopped where the client left, not at max_tokens
