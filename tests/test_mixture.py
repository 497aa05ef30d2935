"""Data mixtures: the config's checks, per-source counts in the data report, sampling shares respected within
sampling error, exact resume of a mixture run, and a tiny two-task run evaluated per task.

    python -m pytest -q tests/test_mixture.py
"""

from __future__ import annotations

import io
import json
import math
import signal
from collections import Counter

import pytest
import torch
from rich.console import Console
from tiny import save_tiny_llama
from train_helpers import causal_examples, collate_causal, config, deterministic, llama, train_losses

from gemcut.config import DataConfig, MixtureConfig, RunConfig, load_config, validate
from gemcut.data.mixture import sampling_shares
from gemcut.data.prepare import prepare
from gemcut.data.report import render, summary_lines
from gemcut.errors import ConfigError
from gemcut.objectives import CausalLM

WORDS = {"positive": ["love", "great", "wonderful"], "negative": ["hate", "terrible", "awful"], "neutral": ["okay", "weather", "today"]}


def _files(tmp_path):
    labels = [{"text": f"i {WORDS[lab][i % 3]} this thing number {i}", "label": lab}
              for i in range(60) for lab in [["positive", "negative", "neutral"][i % 3]]]
    chats = [{"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                           {"role": "assistant", "content": f"the answer is {i + 1}."}]} for i in range(40)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return tmp_path / "labels.jsonl", tmp_path / "chats.jsonl"


def _mixture(labels, chats, **weights) -> dict:
    return {"sources": [
        {"name": "sentiment", "train": [str(labels)], "kind": "label", "labels": ["negative", "neutral", "positive"],
         "instruction": "Sentiment of: {text}", **({"weight": weights["sentiment"]} if weights else {})},
        {"name": "chat", "train": [str(chats)], **({"weight": weights["chat"]} if weights else {})},
    ]}


@pytest.mark.parametrize("data, message", [
    ({"train": ["x.jsonl"], "mixture": {"sources": [{"name": "a", "train": ["y.jsonl"]}]}}, "data.train and data.mixture are both set"),
    ({"mixture": {"sources": [{"name": "a", "train": ["y"], "weight": 1}, {"name": "b", "train": ["z"]}]}}, "some sources have a weight and b do not"),
    ({"mixture": {"temperature": 2, "sources": [{"name": "a", "train": ["y"], "weight": 1}]}}, "both weights and a temperature"),
    ({"mixture": {"sources": [{"name": "a", "train": ["y"]}, {"name": "a", "train": ["z"]}]}}, 'the name "a" is used twice'),
    ({"packing": True, "mixture": {"sources": [{"name": "a", "train": ["y"]}]}}, "data.packing with data.mixture"),
])
def test_bad_mixtures_are_refused_with_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        validate({"data": data})
    with pytest.raises(ConfigError, match="set train.group_by_length=auto or false"):
        validate({"data": {"mixture": {"sources": [{"name": "a", "train": ["y"]}]}}, "train": {"group_by_length": True}})
    with pytest.raises(ConfigError, match="set objective.kind=causal_lm"):
        validate({"data": {"mixture": {"sources": [{"name": "a", "train": ["y"]}]}}, "objective": {"kind": "dpo"}})


def test_sampling_shares_from_weights_or_temperature():
    def mix(temperature=None, weights=(None, None)):
        return MixtureConfig.model_validate({"temperature": temperature, "sources": [
            {"name": "a", "train": ["x"], "weight": weights[0]}, {"name": "b", "train": ["y"], "weight": weights[1]}]})

    sizes = {"a": 100, "b": 900}
    assert sampling_shares(mix(), sizes) == pytest.approx({"a": 0.1, "b": 0.9})
    assert sampling_shares(mix(temperature=2), sizes) == pytest.approx({"a": 10 / 40, "b": 30 / 40})
    assert sampling_shares(mix(weights=(1, 3)), sizes) == pytest.approx({"a": 0.25, "b": 0.75})
    assert sampling_shares(mix(weights=(1, 3)), {"a": 0, "b": 5}) == {"a": 0.0, "b": 1.0}  # an empty source is never drawn


def test_prepare_renders_each_source_as_chats_and_counts_it(tmp_path):
    labels, chats = _files(tmp_path)
    cfg = DataConfig.model_validate({"mixture": _mixture(labels, chats, sentiment=1, chat=3), "split": {"validation": 0.2, "test": 0.2}})
    prepared = prepare(cfg, tmp_path / "out")
    assert prepared.kind == "messages"
    rep = json.loads((tmp_path / "out" / "data_report.json").read_text())
    by_name = {s["name"]: s for s in rep["mixture"]["sources"]}
    assert by_name["sentiment"]["kind"] == "label" and by_name["chat"]["kind"] == "messages"
    assert by_name["sentiment"]["sampling_share"] == 0.25 and by_name["chat"]["sampling_share"] == 0.75
    assert by_name["sentiment"]["records"]["rows_read"] == 60 and by_name["chat"]["records"]["rows_read"] == 40
    for split in ("train", "validation", "test"):
        assert sum(s["splits"][split] for s in by_name.values()) == rep["splits"][split]["count"] == len(prepared.splits[split])
        assert Counter(r["mixture_source"] for r in prepared.splits[split]) == {n: s["splits"][split] for n, s in by_name.items()}
    assert rep["records"]["rows_read"] == 100
    lines = summary_lines(rep)
    assert any(line.startswith("source chat (messages): train ") and line.endswith("sampled share 75.0%") for line in lines)
    render(rep, Console(file=io.StringIO(), width=200))  # the terminal tables, a Mixture table among them
    first = next(r for r in prepared.splits["train"] if r["mixture_source"] == "sentiment")
    assert first["messages"][0]["content"].startswith("Sentiment of: i ") and first["messages"][1]["content"] == first["label"]
    test = [r["mixture_source"] for r in prepared.splits["test"]]
    assert test[:2] in (["sentiment", "chat"], ["chat", "sentiment"])  # interleaved: the first N hold every task


def test_mixture_weights_respected_within_sampling_error():
    from gemcut.train.batches import mixture_order

    sources = ["big"] * 1000 + ["small"] * 50
    shares = {"big": 0.3, "small": 0.7}
    n = len(sources)
    for epoch in (0, 1):
        order = mixture_order(sources, shares, seed=3, epoch=epoch)
        assert len(order) == n
        drawn = Counter(sources[i] for i in order)
        for name, p in shares.items():  # a binomial count: within 4 standard deviations of n*p
            assert abs(drawn[name] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (epoch, name, drawn)
        small = Counter(i for i in order if sources[i] == "small")
        assert max(small.values()) - min(small.values()) <= 1  # a source is gone through whole before it repeats
    assert mixture_order(sources, shares, seed=3, epoch=0) == mixture_order(sources, shares, seed=3, epoch=0)
    assert mixture_order(sources, shares, seed=3, epoch=0) != mixture_order(sources, shares, seed=3, epoch=1)


def test_mixture_batches_mix_the_sources_even_where_length_grouping_is_on():
    from gemcut.train.batches import ExampleSource

    examples = [{"input_ids": [5] * (4 if i % 2 else 60), "labels": [5] * (4 if i % 2 else 60), "mixture_source": "ab"[i % 2]}
                for i in range(400)]
    mixture = MixtureConfig.model_validate({"sources": [{"name": "a", "train": ["x"]}, {"name": "b", "train": ["y"]}]})
    cfg = config(batch_size=8).train
    source = ExampleSource(examples, collate_causal, cfg, group_by_length=True, mixture=mixture)  # what run.py passes for auto
    order = source.order(0)
    batches = [{examples[i]["mixture_source"] for i in order[s:s + 8]} for s in range(0, len(order), 8)]
    assert sum(len(b) == 2 for b in batches) >= 0.9 * len(batches)  # grouped by length, nearly every batch would be one source


class InterruptAt:
    """The objective, sending this process SIGINT inside training step `step` (the loop saves and stops after it)."""

    def __init__(self, inner, step: int):
        self.inner, self.task, self.step, self.calls = inner, inner.task, step, 0

    def count(self, batch):
        return self.inner.count(batch)

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.step:
                signal.raise_signal(signal.SIGINT)
        return self.inner(model, batch)


def _mixture_fit(run_dir, objective, resume=False):
    from gemcut.tasks import task_named
    from gemcut.train.batches import ExampleSource
    from gemcut.train.loop import fit

    deterministic()
    examples = [{**ex, "mixture_source": "a" if i % 4 else "b"} for i, ex in enumerate(causal_examples(40))]
    cfg = config(max_steps=12, save_every=2, keep_last_n=10)
    mixture = MixtureConfig.model_validate({"sources": [{"name": "a", "train": ["x"], "weight": 1}, {"name": "b", "train": ["y"], "weight": 3}]})
    source = ExampleSource(examples, collate_causal, cfg.train, group_by_length=False, mixture=mixture)
    return fit(llama(), objective, source, config=cfg, task=task_named("causal_lm"), run_dir=run_dir, data_hash="mixture-v1", resume=resume)


def test_exact_resume_of_a_mixture_run(tmp_path):
    straight = tmp_path / "straight"
    _mixture_fit(straight, CausalLM())
    run = tmp_path / "run"
    stopped = _mixture_fit(run, InterruptAt(CausalLM(), 5))
    assert stopped.stopped == "interrupted" and stopped.state.step == 5  # mid-epoch: 40 draws, 4 a step
    result = _mixture_fit(run, CausalLM(), resume=True)
    assert result.state.step == 12
    assert train_losses(run) == pytest.approx(train_losses(straight), rel=1e-6)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    drawn = [(r["examples_a"], r["examples_b"]) for r in rows if "examples_a" in r]
    assert len(drawn) == 12 and all(a + b == 4 for a, b in drawn)  # each step's draws, by source


def test_two_task_run_is_evaluated_per_task(tmp_path):
    from gemcut.eval.evaluate import evaluate
    from gemcut.train.run import train

    labels, chats = _files(tmp_path)
    model = save_tiny_llama(tmp_path / "tiny-llama")
    cfg = RunConfig.model_validate({
        "data": {"mixture": _mixture(labels, chats), "split": {"validation": 0.2, "test": 0.2}, "max_length": 64},
        "model": {"name": str(model)}, "adapter": {"r": 4},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "sample_prompts": 0, "warmup_steps": 0},
        "eval": {"forgetting_data": str(chats), "bootstrap": 50, "max_new_tokens": 6, "baselines": []},
        "output": {"dir": str(tmp_path / "runs"), "name": "mix"},
    })
    run = train(cfg)
    report = json.loads((run / "data_report.json").read_text())
    assert [s["name"] for s in report["mixture"]["sources"]] == ["sentiment", "chat"]
    assert report["mixture"]["shares_from"] == "temperature 1.0"
    ev = evaluate(run)
    per = ev["per_source"]
    assert per["sentiment"]["task"] == "generative_classification" and per["chat"]["task"] == "generation"
    assert per["sentiment"]["n"] + per["chat"]["n"] == ev["n_examples"]
    assert per["sentiment"]["labels"] == ["negative", "neutral", "positive"]
    assert "macro_f1" in per["sentiment"]["tuned"] and "perplexity" in per["chat"]["tuned"] and "macro_f1" in per["sentiment"]["deltas"]
    assert ev["forgetting"]["in_training_data"]  # the chats are a source: measuring them would be fit, not forgetting
    html = (run / "report.html").read_text()
    assert "Per task (data mixture)" in html and 'data-source="chat"' in html
    assert torch.isfinite(torch.tensor(per["chat"]["tuned"]["perplexity"]))


def test_example_mixture_config_validates():
    cfg = load_config("examples/mixture_sentiment_chat.yaml")
    assert [s.name for s in cfg.data.mixture.sources] == ["sentiment", "chat"]
