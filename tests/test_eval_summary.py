"""summarise(): metrics of both models, paired intervals of every difference, and the headline line."""

import numpy as np
import pytest

from gemcut.eval.summary import ModelResults, headline_text, summarise

LABELS = ["negative", "neutral", "positive"]


def test_headline_and_deltas_on_a_synthetic_classifier():
    rng = np.random.default_rng(0)
    n = 900
    truth = [LABELS[i % 3] for i in range(n)]

    def answers(p_right: float, p_unparseable: float):
        out = []
        for t in truth:
            u = rng.random()
            out.append(t if u < p_right else (None if u < p_right + p_unparseable else LABELS[(LABELS.index(t) + 1) % 3]))
        return out

    tuned = ModelResults(predictions=answers(0.7, 0.05))
    base = ModelResults(predictions=answers(0.3, 0.3))
    s = summarise("generative_classification", truth, LABELS, tuned, base, n_resamples=300, seed=0)
    d = s["deltas"]["macro_f1"]
    assert d["diff"] == pytest.approx(s["tuned"]["macro_f1"] - s["base"]["macro_f1"])
    assert 0.3 < d["diff"] < 0.5 and d["low"] < d["diff"] < d["high"]
    assert s["deltas"]["unparseable_rate"]["diff"] < 0 and not s["deltas"]["unparseable_rate"]["higher_is_better"]
    assert s["base"]["unparseable"] == sum(p is None for p in base.predictions)
    text = headline_text(s)
    assert text == f"macro-F1 {d['base']:.2f} -> {d['tuned']:.2f} ({d['diff']:+.2f} ± {d['half_width']:.2f})"
    alone = summarise("generative_classification", truth, LABELS, tuned, None)
    assert alone["base"] is None and alone["deltas"] == {} and headline_text(alone) == f"macro-F1 {alone['tuned']['macro_f1']:.2f}"


def test_generation_and_perplexity_metrics():
    refs = ["the cat sat on the mat", "paris is the capital"]
    tuned = ModelResults(texts=["the cat sat on the mat", "paris"], nll=[(2.0, 4), (1.0, 4)])
    base = ModelResults(texts=["a dog", "london is big"], nll=[(8.0, 4), (4.0, 4)])
    s = summarise("generation", refs, [], tuned, base, n_resamples=50)
    assert s["tuned"]["exact_match"] == 0.5 and s["base"]["exact_match"] == 0
    assert s["tuned"]["loss"] == pytest.approx(3 / 8) and s["tuned"]["perplexity"] == pytest.approx(np.exp(3 / 8))
    assert s["deltas"]["perplexity"]["diff"] == pytest.approx(np.exp(3 / 8) - np.exp(12 / 8))
    assert s["headline_metric"] == "rougeL"
