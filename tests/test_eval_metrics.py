"""Metric values against hand-computed references; unparseable answers are counted and shown, never scored."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from gemcut.eval import metrics as M

TRUE = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", None, "a"]
LABELS = ["a", "b", "c"]


def test_classification_against_hand_computed_values():
    m = M.classification_metrics(TRUE, PRED, LABELS)
    # a: tp 2 of 3 predicted, 3 true; b: tp 1 of 2 predicted, 2 true; c: never predicted, 1 true.
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 0, "recall": 0, "f1": 0, "support": 1})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["macro_precision"] == pytest.approx(7 / 18) and m["macro_recall"] == pytest.approx(7 / 18)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2) / 6)
    assert m["n"] == 6


def test_unparseable_counted_as_wrong_and_shown_in_its_own_column():
    m = M.classification_metrics(TRUE, PRED, LABELS)
    assert m["unparseable"] == 1
    assert m["confusion"]["columns"] == ["a", "b", "c", "unparseable"]
    assert m["confusion"]["matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]]
    # Every example is in the matrix: nothing dropped.
    assert sum(map(sum, m["confusion"]["matrix"])) == len(TRUE)
    all_bad = M.classification_metrics(["a", "b"], [None, None], ["a", "b"])
    assert all_bad["accuracy"] == 0 and all_bad["macro_f1"] == 0 and all_bad["unparseable"] == 2


def test_label_named_unparseable_and_unknown_true_labels_are_rejected():
    with pytest.raises(ValueError, match="unparseable"):
        M.classification_metrics(["unparseable"], ["unparseable"], ["unparseable"])
    with pytest.raises(ValueError, match="not in the label set"):
        M.classification_metrics(["z"], ["a"], ["a"])


def test_fast_f1_equals_scikit_learn():
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        true = rng.integers(0, k, 200)
        pred = rng.integers(0, k + 1, 200)  # k = unparseable
        labels = list(range(k))
        pred_named = np.where(pred == k, -1, pred)
        assert M.macro_f1_fast(true, pred, k) == pytest.approx(f1_score(true, pred_named, labels=labels, average="macro", zero_division=0))
        assert M.weighted_f1_fast(true, pred, k) == pytest.approx(f1_score(true, pred_named, labels=labels, average="weighted", zero_division=0))
        assert M.accuracy_fast(true, pred) == pytest.approx(float((true == pred).mean()))


def test_generation_metrics_hand_computed():
    assert M.exact_match(["Paris", " Paris \n", "paris"], ["Paris", "Paris", "Paris"]) == pytest.approx(2 / 3)
    r = M.rouge_scores(["the cat sat"], ["the cat sat on the mat"])[0]
    # unigrams: 3 of 3 predicted, 3 of 6 reference -> F = 2/3; bigrams: 2 of 2, 2 of 5 -> F = 4/7; LCS 3 -> 2/3.
    assert r == pytest.approx({"rouge1": 2 / 3, "rouge2": 4 / 7, "rougeL": 2 / 3})
    # n-gram precisions 3/4, 2/3, 1/2 and 0/1 (smoothed to 1/2), no brevity penalty.
    assert M.bleu(["a b c d"], ["a b c e"]) == pytest.approx(100 * (0.75 * 2 / 3 * 0.5 * 0.5) ** 0.25)
    assert M.bleu(["the very same four words"], ["the very same four words"]) == pytest.approx(100)
    g = M.generation_metrics(["the cat sat", "x"], ["the cat sat on the mat", "x"])
    assert g["rouge1"] == pytest.approx((2 / 3 + 1) / 2) and g["exact_match"] == 0.5 and g["n"] == 2


def test_bleu_from_summed_stats_equals_corpus_bleu():
    preds = ["the cat sat on the mat", "a dog barks", "hello there friend", "x y z"]
    refs = ["the cat is on the mat", "the dog barks loudly", "hello there", "x y z w"]
    stats = M.bleu_stats(preds, refs)
    assert M.bleu_from_stats(stats.sum(axis=0)) == pytest.approx(M.bleu(preds, refs))
    idx = [0, 0, 2]
    assert M.bleu_from_stats(stats[idx].sum(axis=0)) == pytest.approx(M.bleu([preds[i] for i in idx], [refs[i] for i in idx]))


def test_perplexity_and_pairwise_accuracy():
    # 6 nats over 4 tokens -> exp(1.5); token-weighted, not a mean of per-example perplexities.
    assert M.perplexity([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(1.5))
    assert math.isnan(M.perplexity([], []))
    assert M.pairwise_accuracy([1, 2, 3], [0, 2, 4]) == pytest.approx(1 / 3)  # a tie counts as wrong
