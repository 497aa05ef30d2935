"""gemcut.generation: batched greedy equals one-by-one greedy, seeded sampling repeats, stops are honoured."""

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from gemcut.data.templates import ChatTemplate
from gemcut.generation import default_eos_ids, generate, generate_messages

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, seed=1)


PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog.", "i", "what is the capital of france?"]


def ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def test_batched_greedy_equals_unbatched_and_hf_generate(model, tok):
    prompts = ids(tok, PROMPTS)
    assert len({len(p) for p in prompts}) > 1  # different lengths, so left padding is exercised
    batched = generate(model, tok, prompts, max_new_tokens=12, eos_ids=[])
    for p, b in zip(prompts, batched):
        alone = generate(model, tok, [p], max_new_tokens=12, eos_ids=[])[0]
        assert b.token_ids == alone.token_ids
        assert b.text == alone.text == tok.decode(alone.token_ids, skip_special_tokens=True)
        assert b.finish_reason == "length" and len(b.token_ids) == 12
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert ref[0, len(p):].tolist() == alone.token_ids


def test_batch_size_split_does_not_change_greedy(model, tok):
    prompts = ids(tok, PROMPTS)
    whole = generate(model, tok, prompts, max_new_tokens=6, eos_ids=[])
    split = generate(model, tok, prompts, max_new_tokens=6, eos_ids=[], batch_size=3)
    assert [r.token_ids for r in whole] == [r.token_ids for r in split]


def test_seeded_sampling_is_reproducible_and_seed_matters(model, tok):
    prompts = ids(tok, PROMPTS)
    a = generate(model, tok, prompts, max_new_tokens=10, temperature=1.0, seed=7, eos_ids=[])
    b = generate(model, tok, prompts, max_new_tokens=10, temperature=1.0, seed=7, eos_ids=[])
    c = generate(model, tok, prompts, max_new_tokens=10, temperature=1.0, seed=8, eos_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    greedy = generate(model, tok, prompts, max_new_tokens=10, eos_ids=[])
    assert [r.token_ids for r in a] != [r.token_ids for r in greedy]


def test_tiny_top_p_is_greedy(model, tok):
    prompts = ids(tok, PROMPTS)
    nucleus = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3, eos_ids=[])
    greedy = generate(model, tok, prompts, max_new_tokens=8, eos_ids=[])
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy]


def test_stop_string_cuts_text(model, tok):
    prompt = ids(tok, ["hello"])
    full = generate(model, tok, prompt, max_new_tokens=20, temperature=1.0, seed=5, eos_ids=[])[0]
    assert len(full.text) > 8
    stop = full.text[4:7]
    cut = generate(model, tok, prompt, max_new_tokens=20, temperature=1.0, seed=5, stop=[stop], eos_ids=[])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    assert len(cut.token_ids) < len(full.token_ids)
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_eos_id_ends_a_row_without_entering_the_text(model, tok):
    prompts = ids(tok, PROMPTS)
    free = generate(model, tok, prompts, max_new_tokens=10, eos_ids=[])
    # Make the third generated token of the first prompt an end id: that row stops there, the others are unchanged.
    end = free[0].token_ids[2]
    ended = generate(model, tok, prompts, max_new_tokens=10, eos_ids=[end])
    assert ended[0].finish_reason == "stop"
    assert end not in ended[0].token_ids
    assert ended[0].token_ids == free[0].token_ids[: free[0].token_ids.index(end)]
    for f, e in zip(free[1:], ended[1:]):
        if end not in f.token_ids:
            assert e.token_ids == f.token_ids and e.finish_reason == "length"


def test_default_eos_and_messages(model, tok):
    assert tok.eos_token_id in default_eos_ids(model, tok)
    template = ChatTemplate.from_tokenizer(tok)
    conv = [[{"role": "user", "content": "hello world"}], [{"role": "user", "content": "what is the capital?"}]]
    via_messages = generate_messages(model, tok, template, conv, max_new_tokens=5)
    direct = generate(model, tok, [template.prompt_ids(c) for c in conv], max_new_tokens=5)
    assert [r.token_ids for r in via_messages] == [r.token_ids for r in direct]


def test_bad_arguments():
    tok = tiny_tokenizer()
    m = tiny_llama(tok)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(m, tok, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, tok, [[1, 2]], max_new_tokens=2, top_p=0)


def test_stream_equals_generate(model, tok):
    from gemcut.generation import stream_generate

    prompt = ids(tok, ["hello world"])[0]
    for kwargs in ({}, {"temperature": 1.0, "seed": 11}, {"temperature": 0.9, "top_p": 0.8, "seed": 2}):
        whole = generate(model, tok, [prompt], max_new_tokens=15, eos_ids=[], **kwargs)[0]
        deltas = list(stream_generate(model, tok, prompt, max_new_tokens=15, eos_ids=[], **kwargs))
        assert "".join(d.text for d in deltas) == whole.text
        assert [t for d in deltas for t in d.token_ids] == whole.token_ids
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1) and deltas[-1].finish_reason == "length"
    sampled = generate(model, tok, [prompt], max_new_tokens=20, temperature=1.0, seed=5, eos_ids=[])[0]
    stop = sampled.text[4:7]
    cut = generate(model, tok, [prompt], max_new_tokens=20, temperature=1.0, seed=5, eos_ids=[], stop=[stop])[0]
    deltas = list(stream_generate(model, tok, prompt, max_new_tokens=20, temperature=1.0, seed=5, eos_ids=[], stop=[stop]))
    assert "".join(d.text for d in deltas) == cut.text and deltas[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in deltas)


def test_apply_penalties_is_openais_formula():
    from gemcut.generation import apply_penalties

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, generator=g)
    counts = torch.tensor([[0, 1, 3, 0, 0, 2, 0], [5, 0, 0, 0, 1, 0, 0]], dtype=torch.float32)
    out = apply_penalties(logits, counts, presence=0.5, frequency=-1.25)
    for r in range(2):
        for v in range(7):
            c = counts[r, v].item()
            assert out[r, v].item() == pytest.approx(logits[r, v].item() - 0.5 * (c > 0) - (-1.25) * c, abs=1e-6)


def test_penalties_bias_and_logprobs_keep_batched_equal_to_unbatched(model, tok):
    prompts = ids(tok, PROMPTS)
    kwargs = dict(max_new_tokens=10, eos_ids=[], presence_penalty=0.7, frequency_penalty=1.3, logit_bias={5: 2.0, 40: -3.0}, logprobs=3)
    batched = generate(model, tok, prompts, **kwargs)
    plain = generate(model, tok, prompts, max_new_tokens=10, eos_ids=[])
    assert [r.token_ids for r in batched] != [r.token_ids for r in plain]  # the penalties change the output
    for p, b in zip(prompts, batched):
        alone = generate(model, tok, [p], **kwargs)[0]
        assert b.token_ids == alone.token_ids
        assert [lp.logprob for lp in b.logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs], abs=1e-5)


def test_logprobs_are_the_raw_log_softmax(model, tok):
    prompt = ids(tok, ["hello world"])[0]
    r = generate(model, tok, [prompt], max_new_tokens=6, eos_ids=[], logprobs=4, frequency_penalty=2.0)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + r.token_ids])).logits[0, len(prompt) - 1:-1].float()
    ref = torch.log_softmax(logits, dim=-1)
    for step, lp in enumerate(r.logprobs):
        assert lp.token_id == r.token_ids[step]
        assert lp.logprob == pytest.approx(ref[step, lp.token_id].item(), abs=1e-5)
        values, order = ref[step].topk(4)
        assert [t for t, _ in lp.top] == order.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_stream_equals_generate_with_penalties_and_logprobs(model, tok):
    from gemcut.generation import stream_generate

    prompt = ids(tok, ["hello world"])[0]
    kwargs = dict(max_new_tokens=12, eos_ids=[], temperature=0.9, seed=4, presence_penalty=1.0, frequency_penalty=0.5, logprobs=2)
    whole = generate(model, tok, [prompt], **kwargs)[0]
    deltas = list(stream_generate(model, tok, prompt, **kwargs))
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert [lp.token_id for d in deltas for lp in (d.logprobs or [])] == whole.token_ids
