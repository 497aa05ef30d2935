"""Paired bootstrap: the interval contains the true difference on a synthetic case, and is reproducible."""

import numpy as np
import pytest

from gemcut.eval.bootstrap import paired_bootstrap, paired_bootstrap_indexed


def accuracy(pairs):
    return float(np.mean([t == p for t, p in pairs]))


def synthetic(rng, n, p_base, p_tuned):
    truth = rng.integers(0, 3, n)
    base = [(t, t if rng.random() < p_base else (t + 1) % 3) for t in truth]
    tuned = [(t, t if rng.random() < p_tuned else (t + 1) % 3) for t in truth]
    return tuned, base


def test_interval_contains_true_difference():
    rng = np.random.default_rng(0)
    tuned, base = synthetic(rng, 2000, 0.5, 0.7)
    ci = paired_bootstrap(accuracy, tuned, base, n_resamples=300, seed=1)
    assert ci["low"] < 0.2 < ci["high"]
    assert ci["diff"] == pytest.approx(ci["tuned"] - ci["base"])
    assert ci["low"] <= ci["diff"] <= ci["high"]
    assert ci["half_width"] == pytest.approx((ci["high"] - ci["low"]) / 2)
    assert 0.01 < ci["half_width"] < 0.05  # about 1.96 * sqrt(0.5*0.5/2000 + 0.7*0.3/2000) = 0.029


def test_coverage_is_close_to_nominal():
    # Over repeated synthetic test sets, a 90% interval should contain the true difference about 90% of the time.
    rng = np.random.default_rng(1)
    hits = 0
    trials = 40
    for i in range(trials):
        t_ok = rng.random(400) < 0.65
        b_ok = rng.random(400) < 0.55
        ci = paired_bootstrap_indexed(lambda idx, t=t_ok: t[idx].mean(), lambda idx, b=b_ok: b[idx].mean(), 400,
                                      n_resamples=200, seed=i, confidence=0.9)
        hits += ci["low"] <= 0.10 <= ci["high"]
    assert hits >= 30


def test_seeded_and_point_estimate_only():
    rng = np.random.default_rng(2)
    tuned, base = synthetic(rng, 300, 0.6, 0.6)
    a = paired_bootstrap(accuracy, tuned, base, n_resamples=100, seed=5)
    b = paired_bootstrap(accuracy, tuned, base, n_resamples=100, seed=5)
    c = paired_bootstrap(accuracy, tuned, base, n_resamples=100, seed=6)
    assert (a["low"], a["high"]) == (b["low"], b["high"])
    assert (a["low"], a["high"]) != (c["low"], c["high"])
    none = paired_bootstrap(accuracy, tuned, base, n_resamples=0)
    assert none["low"] is None and none["diff"] == pytest.approx(a["diff"])


def test_pairing_narrows_the_interval():
    # Both models get the same hard examples wrong: pairing removes that shared variance.
    rng = np.random.default_rng(3)
    hard = rng.random(1000) < 0.4
    base_ok = ~hard
    tuned_ok = ~hard | (rng.random(1000) < 0.1)
    ci = paired_bootstrap_indexed(lambda i: tuned_ok[i].mean(), lambda i: base_ok[i].mean(), 1000, n_resamples=300)
    unpaired_sd = np.sqrt(tuned_ok.var() / 1000 + base_ok.var() / 1000)
    assert ci["half_width"] < 1.96 * unpaired_sd / 2


def test_misaligned_results_are_an_error():
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap(accuracy, [(0, 0)], [], n_resamples=10)
