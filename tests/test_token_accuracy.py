"""Token accuracy of the causal-LM objective: the fraction of trained tokens whose argmax prediction is the label.

    python -m pytest -q tests/test_token_accuracy.py

Pinned against a hand computation (each example run alone through plain transformers, argmax of its logits
against its shifted labels) on the chunked head, the plain-logits path (a LoRA-adapted head), packed rows, and
through the loop into metrics.jsonl (training and validation lines).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from train_helpers import causal_examples, collate_causal, config, fit_examples

from gemcut.config import AdapterConfig
from gemcut.data.collate import collate_causal as collate_packed
from gemcut.data.collate import pack_examples
from gemcut.models.adapters import apply_adapter
from gemcut.objectives import CausalLM, chunked_ce
from gemcut.objectives.causal_lm import TOKEN_ACCURACY
from gemcut.objectives.chunked_ce import linear_cross_entropy_and_hits


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def peaky_llama():
    """A tiny Llama whose predictions are confident enough that some land on the label (random ids otherwise
    rarely match, and an accuracy of 0 would pin nothing)."""
    model = tiny_llama(tiny_tokenizer(), seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
    return model


def learnable_examples(n: int = 8, seed: int = 0) -> list[dict]:
    """Repeating patterns (a b c a b c ...), half of each masked like a prompt: a model gets some right."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        period = [rng.randrange(5, 60) for _ in range(rng.randrange(1, 4))]
        ids = (period * 20)[: rng.randrange(8, 18)]
        cut = len(ids) // 2
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


@torch.no_grad()
def hand_hits(model, examples) -> tuple[int, int]:
    """(argmax hits, trained tokens), each example alone: logits[t] predicts labels[t + 1]."""
    hits = total = 0
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(ex["labels"][1:])
        keep = labels != -100
        hits += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
    return hits, total


def test_chunked_hits_equal_the_argmax_of_the_whole_logits(monkeypatch):
    monkeypatch.setattr(chunked_ce, "LOGITS_BUDGET", 3 * 40)  # 3 rows a chunk: several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(11, 8, generator=g), torch.randn(40, 8, generator=g)
    logits = hidden @ weight.T
    targets = logits.argmax(-1).clone()
    targets[::2] = (targets[::2] + 1) % 40  # every other row wrong: 5 of 11 right
    loss, hits = linear_cross_entropy_and_hits(hidden.requires_grad_(True), weight, targets)
    assert int(hits) == 5 and hits.dtype == torch.long and not hits.requires_grad
    loss.backward()  # the hit count does not get in the way of the gradient
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("head", ["chunked", "adapted"])
def test_objective_counts_the_hits_of_each_example_alone(head):
    model = peaky_llama()
    if head == "adapted":  # a LoRA on lm_head: the head is no plain Linear, so the logits path runs
        model = apply_adapter(model, AdapterConfig(r=4, target_modules=["lm_head", "q_proj"]), "causal_lm")
    examples = learnable_examples()
    want_hits, want_total = hand_hits(model, examples)
    assert 0 < want_hits < want_total  # the test pins something
    with torch.no_grad():
        out = CausalLM()(model, collate_causal(examples))
    assert out.n_targets == want_total and int(out.metrics[TOKEN_ACCURACY]) == want_hits


def test_packed_rows_give_the_hits_of_the_examples_alone():
    model, examples = peaky_llama(), learnable_examples(n=10, seed=1)
    packed = pack_examples(examples, max_length=40)
    assert len(packed) < len(examples)  # several examples share a row
    batch = collate_packed(packed, pad_id=0)
    assert "position_ids" in batch and "attention_mask" not in batch  # padding-free: documents by positions
    with torch.no_grad():
        out = CausalLM()(model, batch)
    assert (int(out.metrics[TOKEN_ACCURACY]), out.n_targets) == hand_hits(model, examples)


def test_loop_logs_the_fraction_of_each_step_and_of_validation(tmp_path):
    model, train, val = peaky_llama(), learnable_examples(n=8, seed=2), learnable_examples(n=5, seed=3)
    before_hits, before_total = hand_hits(model, val)
    # One step over the whole set, in two micro-batches: the step's fraction is over all its tokens.
    step_hits, step_total = hand_hits(model, train)
    cfg = config(max_steps=1, batch_size=8, micro_batch_size=4, lr=1e-6, warmup_steps=0)
    fit_examples(model, CausalLM(), train, collate_causal, config=cfg, run_dir=tmp_path, val_set=val)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(x for x in lines if "loss" in x and x.get("split") != "validation")
    assert step[TOKEN_ACCURACY] == pytest.approx(step_hits / step_total, abs=1e-6)
    validation = next(x for x in lines if x.get("split") == "validation")
    after_hits, after_total = hand_hits(model, val)  # validated after the step (lr 1e-6: the same argmaxes)
    assert after_total == before_total == validation["val_targets"]
    assert validation[f"val_{TOKEN_ACCURACY}"] == pytest.approx(after_hits / after_total, abs=1e-6)


def test_random_examples_log_an_accuracy_between_zero_and_one(tmp_path):
    fit_examples(tiny_llama(tiny_tokenizer()), CausalLM(), causal_examples(8), collate_causal,
                 config=config(max_steps=2), run_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(lines) == 2 and all(0 <= x[TOKEN_ACCURACY] <= 1 for x in lines)
