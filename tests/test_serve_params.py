"""Request parameters beyond sampling, against a real uvicorn server on loopback with the official `openai`
client: logprobs, penalties, logit_bias, stream_options.include_usage, response_format (constrained JSON),
the 400s for what is not supported, and /v1/embeddings for encoder runs.

    python -m pytest -q tests/test_serve_params.py
"""

from __future__ import annotations

import base64
import json
import struct

import jsonschema
import openai
import pytest
import torch
from serve_runs import API_KEY, classifier, plain_model, running
from tiny import tiny_tokenizer

from gemcut.serve.app import create_app
from gemcut.serve.settings import ServeSettings

MSG = [{"role": "user", "content": "what is the capital of france?"}]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: a token's characters back to its bytes (independent of the server)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


BYTES = _byte_decoder()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoModel, AutoModelForCausalLM

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("params")
    lm = plain_model(tmp / "tiny-chat")
    clf = classifier(tmp / "tiny-clf")
    enc = tmp / "tiny-enc"  # a plain encoder folder (BertModel), as a sentence-embedding checkpoint is
    AutoModel.from_pretrained(clf).save_pretrained(enc)
    tiny_tokenizer().save_pretrained(enc)
    settings = ServeSettings(models=[str(lm), str(clf), str(enc)], api_keys=[API_KEY], db_url=f"sqlite:///{tmp / 'serve.db'}",
                             default_max_tokens=12, max_n=4)
    app = create_app(settings)
    with running(app) as url:
        yield {"url": url, "app": app, "client": openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0),
               "lm": AutoModelForCausalLM.from_pretrained(lm).eval(), "clf": clf, "enc": enc, "tok": tiny_tokenizer()}


def chat(client, **kw):
    kw.setdefault("model", "tiny-chat")
    kw.setdefault("messages", MSG)
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(**kw)


def _token_bytes(tok, token_id: int) -> list[int]:
    return list(bytes(BYTES[c] for c in tok.convert_ids_to_tokens(token_id)))


def _ids_of(tok, entries) -> list[int]:
    """Token ids of logprob entries, from their bytes (every tiny-vocabulary token has distinct bytes)."""
    by_bytes = {tuple(_token_bytes(tok, i)): i for i in range(len(tok)) if i not in tok.all_special_ids}
    return [by_bytes[tuple(e.bytes)] for e in entries]


def _log_softmax_along(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), V]: the model's log-probabilities at each generated position (one forward pass)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(generated)], dim=-1)


# ---------------------------------------------------------------------------- logprobs


def test_chat_logprobs_are_the_models_log_softmax_and_top_k_in_order(server):
    from gemcut.data.templates import ChatTemplate

    tok, client = server["tok"], server["client"]
    r = chat(client, temperature=0, logprobs=True, top_logprobs=5, max_tokens=8)
    entries = r.choices[0].logprobs.content
    assert 0 < len(entries) == r.usage.completion_tokens
    ids = _ids_of(tok, entries)
    ref = _log_softmax_along(server["lm"], list(ChatTemplate.from_tokenizer(tok).prompt_ids(MSG)), ids)
    for step, (entry, token_id) in enumerate(zip(entries, ids)):
        assert entry.logprob == pytest.approx(ref[step, token_id].item(), abs=1e-4)
        assert entry.bytes == _token_bytes(tok, token_id)
        assert entry.token == bytes(entry.bytes).decode("utf-8", "replace") or entry.token.startswith("bytes:")
        values, order = ref[step].topk(5)
        assert [_ids_of(tok, [t])[0] for t in entry.top_logprobs] == order.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the sampled token is the top one
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    plain = chat(client, temperature=0, max_tokens=8)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_streamed_logprobs_equal_non_streamed(server):
    client = server["client"]
    whole = chat(client, temperature=0, logprobs=True, top_logprobs=2, max_tokens=10).choices[0].logprobs.content
    streamed = []
    for chunk in chat(client, temperature=0, logprobs=True, top_logprobs=2, max_tokens=10, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content or [])
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_completions_logprobs_shape(server):
    r = server["client"].completions.create(model="tiny-chat", prompt="the quick brown fox", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == len("the quick brown fox")
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy
    stream = server["client"].completions.create(model="tiny-chat", prompt="the quick brown fox", max_tokens=5, temperature=0,
                                                 logprobs=3, stream=True)
    tokens = [t for chunk in stream if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_logprob_parameter_errors(server):
    client = server["client"]
    for kw, param in (({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, **kw)
        assert e.value.param == param, e.value
    with pytest.raises(openai.BadRequestError) as e:
        server["client"].completions.create(model="tiny-chat", prompt="hi", max_tokens=2, logprobs=21)
    assert e.value.param == "logprobs"


# ---------------------------------------------------------------------------- penalties and logit_bias


def test_large_frequency_penalty_never_repeats_a_token(server):
    tok, client = server["tok"], server["client"]
    free = chat(client, temperature=0, logprobs=True, max_tokens=40)
    ids = _ids_of(tok, free.choices[0].logprobs.content)
    assert len(set(ids)) < len(ids)  # without the penalty the tiny model repeats itself
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        r = chat(client, temperature=0, logprobs=True, max_tokens=40, **kw)
        ids = _ids_of(tok, r.choices[0].logprobs.content)
        assert len(ids) > 10 and len(set(ids)) == len(ids), kw
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, frequency_penalty=2.5)
    assert e.value.param == "frequency_penalty"


def test_logit_bias_is_added_to_the_logits(server):
    tok, client = server["tok"], server["client"]
    target = tok.convert_tokens_to_ids("Ġbr")
    r = chat(client, temperature=0, logprobs=True, max_tokens=4, logit_bias={str(target): 100})
    assert _ids_of(tok, r.choices[0].logprobs.content) == [target] * 4
    banned = _ids_of(tok, chat(client, temperature=0, logprobs=True, max_tokens=6).choices[0].logprobs.content)
    r = chat(client, temperature=0, logprobs=True, max_tokens=6, logit_bias={str(i): -100 for i in set(banned)})
    assert not set(_ids_of(tok, r.choices[0].logprobs.content)) & set(banned)
    for bad in ({"999999": 1}, {"x": 1}, {"5": 101}):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, logit_bias=bad)
        assert e.value.param.startswith("logit_bias"), e.value


# ---------------------------------------------------------------------------- stream_options


def test_include_usage_adds_a_final_usage_chunk(server):
    client = server["client"]
    whole = chat(client, temperature=0, max_tokens=9)
    chunks = list(chat(client, temperature=0, max_tokens=9, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens and last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in chat(client, temperature=0, max_tokens=4, stream=True))
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, stream_options={"include_usage": True})  # only with stream: true, as OpenAI says
    assert e.value.param == "stream_options"


# ---------------------------------------------------------------------------- refused and no-op parameters

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("param,value", [
    ("tools", [TOOL]), ("tool_choice", "auto"), ("parallel_tool_calls", True),
    ("functions", [TOOL["function"]]), ("function_call", "auto"), ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
    ("service_tier", "flex"), ("store", True), ("reasoning_effort", "low"),
])
def test_unsupported_parameters_are_a_400_naming_them(server, param, value):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server["client"], **{param: value})
    assert e.value.param == param and e.value.code == "unsupported_parameter" and param in e.value.message


def test_harmless_parameters_are_accepted(server):
    r = chat(server["client"], temperature=0, user="u-1", store=False, metadata={"k": "v"}, extra_body={"not_an_openai_field": 1})
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as e:
        server["client"].completions.create(model="tiny-chat", prompt="hi", max_tokens=2, suffix="end")
    assert e.value.param == "suffix"


# ---------------------------------------------------------------------------- response_format

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", 3]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
        "nothing": {"type": "null"},
    },
    "required": ["name", "age", "ok", "kind"],
    "additionalProperties": False,
}


def test_json_object_output_parses_for_any_seed(server):
    client, tok = server["client"], server["tok"]
    # A random model closes a string about once in 384 tokens: a bias on the quote keeps the strings, and the test, short.
    quote = {str(tok.convert_tokens_to_ids('"')): 4}
    for seed in range(4):
        r = chat(client, temperature=1.0, seed=seed, max_tokens=200, response_format={"type": "json_object"}, logit_bias=quote)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)
    free = chat(client, temperature=1.0, seed=0, max_tokens=20).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)  # without the constraint the random model writes anything


def test_json_schema_output_validates_streamed_or_not(server):
    client = server["client"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        r = chat(client, temperature=1.0, seed=seed, max_tokens=200, response_format=fmt, n=2)
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, temperature=1.0, seed=1, max_tokens=200,
                                                                       response_format=fmt, stream=True) if c.choices)
    assert streamed == chat(client, temperature=1.0, seed=1, max_tokens=200, response_format=fmt).choices[0].message.content
    cut = chat(client, temperature=1.0, seed=1, max_tokens=3, response_format=fmt).choices[0]
    assert cut.finish_reason == "length"  # the budget ends it before the value is complete


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^a+$"}}}, "pattern"),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "anyOf"),
    ({"$ref": "#/$defs/x", "$defs": {"x": {"type": "string"}}}, "$ref"),
    ({"type": "strin"}, "type"),
])
def test_unsupported_schema_is_a_400_naming_the_keyword(server, schema, keyword):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server["client"], response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert e.value.param == "response_format.json_schema.schema" and keyword in e.value.message, e.value.message


# ---------------------------------------------------------------------------- embeddings


def _reference_embeddings(folder, texts, pooling: str) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    enc = tiny_tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_embeddings_are_the_runs_pooled_hidden_state(server):
    client, tok = server["client"], server["tok"]
    texts = ["i love this product", "i", "the quick brown fox jumps over the lazy dog."]
    for name, folder, pooling in (("tiny-clf", server["clf"], "cls"), ("tiny-enc", server["enc"], "mean")):
        r = client.embeddings.create(model=name, input=texts)
        got = torch.tensor([d.embedding for d in r.data])
        assert [d.index for d in r.data] == [0, 1, 2] and r.model == name
        assert torch.allclose(got, _reference_embeddings(folder, texts, pooling), atol=1e-5), name
        assert got.norm(dim=-1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(ids) for ids in tok(texts)["input_ids"])
    # base64: little-endian float32, as the openai client decodes it (it asks for base64 by default when numpy is there)
    raw = client.embeddings.with_raw_response.create(model="tiny-enc", input="hello world", encoding_format="base64").http_response.json()
    b64 = raw["data"][0]["embedding"]
    floats = struct.unpack(f"<{len(base64.b64decode(b64)) // 4}f", base64.b64decode(b64))
    single = client.embeddings.create(model="tiny-enc", input="hello world", encoding_format="float").data[0].embedding
    assert list(floats) == pytest.approx(single, abs=1e-6)
    by_ids = client.embeddings.create(model="tiny-enc", input=[tok("hello world")["input_ids"]]).data[0].embedding
    assert by_ids == pytest.approx(single, abs=1e-5)


def test_embedding_errors(server):
    client = server["client"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny-chat", input="hi")
    assert e.value.param == "model"
    assert len(client.embeddings.create(model="tiny-enc", input="hi", dimensions=32).data[0].embedding) == 32
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny-enc", input="hi", dimensions=16)
    assert e.value.param == "dimensions"
    for bad in ("", [], [""], [[]], [999999]):
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="tiny-enc", input=bad)
        assert e.value.param == "input", bad


def test_schema_that_cannot_be_read_is_a_400():
    from gemcut.serve.errors import APIError
    from gemcut.serve.structured import json_grammar

    nested: dict = {"type": "array"}
    deep = nested
    for _ in range(40):
        deep["items"] = {"type": "array"}
        deep = deep["items"]
    for schema in ({"type": "number", "minimum": float("nan")}, nested, {"type": "integer", "minimum": 5, "maximum": 1}):
        with pytest.raises(APIError) as e:
            json_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert e.value.status == 400 and e.value.param == "response_format.json_schema.schema", schema
    assert json_grammar({"type": "text"}) is None and json_grammar(None) is None
