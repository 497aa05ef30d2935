"""Mapping generated text to labels: the documented rule, in order, and unparseable answers counted."""

import pytest

from gemcut.eval.labels import map_many, map_to_label

LABELS = ["negative", "neutral", "positive"]


@pytest.mark.parametrize("text,label,rule", [
    ("positive", "positive", "exact"),
    ("  neutral\n", "neutral", "exact"),
    ("Positive.", "positive", "case_insensitive"),
    ('"NEGATIVE"', "negative", "case_insensitive"),
    ("positive, because the text praises it", "positive", "first_token"),
    ("Negative - clearly", "negative", "first_token"),
    ("The sentiment is neutral.", "neutral", "contains"),
    ("I would say negative overall", "negative", "contains"),
    ("positive or negative, hard to say", "positive", "first_token"),
    ("it is either positive or negative", None, "unparseable"),   # two labels: ambiguous
    ("neutrality", None, "unparseable"),                          # not a whole word
    ("", None, "unparseable"),
    ("bonjour", None, "unparseable"),
])
def test_rule(text, label, rule):
    m = map_to_label(text, LABELS)
    assert (m.label, m.rule) == (label, rule)


def test_longest_label_wins_and_nested_labels_are_not_rivals():
    labels = ["positive", "very positive"]
    assert map_to_label("very positive!", labels).label == "very positive"
    assert map_to_label("I think it is very positive", labels).label == "very positive"
    assert map_to_label("Very positive indeed", labels).rule == "first_token"


def test_map_many_counts_every_rule():
    preds, counts = map_many(["positive", "Neutral", "negative because", "it is positive", "??", "dunno"], LABELS)
    assert preds == ["positive", "neutral", "negative", "positive", None, None]
    assert counts == {"exact": 1, "case_insensitive": 1, "first_token": 1, "contains": 1, "unparseable": 2}
    assert sum(counts.values()) == 6
