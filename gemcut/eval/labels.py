"""Map a generative classifier's free text to one of the labels, or to None (unparseable).

    from gemcut.eval.labels import map_to_label
    map_to_label("Positive.", ["negative", "neutral", "positive"])   # LabelMatch("positive", "case_insensitive")

The rule, tried in order; the first that decides wins:

1. `exact`: the answer, stripped of surrounding whitespace, is a label.
2. `case_insensitive`: the answer, stripped of surrounding whitespace, quotes and end punctuation, equals
   a label ignoring case ("Positive." -> positive).
3. `first_token`: the answer starts with a label as a whole word, ignoring case ("positive, because ..."
   -> positive); the longest such label wins, so "very positive" beats "very" when both are labels.
4. `contains`: exactly one label occurs as a whole word anywhere in the answer, ignoring case ("The
   sentiment is negative" -> negative). Two or more different labels make the answer ambiguous.
5. Otherwise the answer is unparseable: `label=None`, `rule="unparseable"`. The metrics count it as wrong
   and show it in an "unparseable" column of the confusion matrix; it is never guessed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_TRIM = " \t\r\n\"'`“”‘’.,;:!?()[]{}*"


@dataclass(frozen=True)
class LabelMatch:
    label: str | None
    rule: str  # exact | case_insensitive | first_token | contains | unparseable


def _word_pattern(label: str) -> re.Pattern:
    # Whole word: not preceded or followed by a letter/digit, so "neutral" does not match "neutrality".
    return re.compile(r"(?<![\w])" + re.escape(label.lower()) + r"(?![\w])")


def map_to_label(text: str, labels: Sequence[str]) -> LabelMatch:
    """Apply the documented rule (module docstring) to one answer."""
    stripped = text.strip()
    if stripped in labels:
        return LabelMatch(stripped, "exact")
    trimmed = stripped.strip(_TRIM).lower()
    by_lower = {lab.lower(): lab for lab in labels}
    if trimmed in by_lower:
        return LabelMatch(by_lower[trimmed], "case_insensitive")
    lowered = stripped.lower().lstrip(_TRIM)
    starts = [lab for lab in labels if _word_pattern(lab).match(lowered)]
    if starts:
        return LabelMatch(max(starts, key=len), "first_token")
    found = {lab for lab in labels if _word_pattern(lab).search(stripped.lower())}
    # A label contained in a longer label that was also found ("positive" in "very positive") is not a rival.
    found = {lab for lab in found if not any(lab != other and _word_pattern(lab).search(other.lower()) for other in found)}
    if len(found) == 1:
        return LabelMatch(found.pop(), "contains")
    return LabelMatch(None, "unparseable")


def map_many(texts: Sequence[str], labels: Sequence[str]) -> tuple[list[str | None], dict[str, int]]:
    """Map every answer; returns the labels (None where unparseable) and how many answers each rule decided."""
    matches = [map_to_label(t, labels) for t in texts]
    counts = Counter(m.rule for m in matches)
    rules = {r: counts.get(r, 0) for r in ("exact", "case_insensitive", "first_token", "contains", "unparseable")}
    return [m.label for m in matches], rules
