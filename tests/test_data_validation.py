"""Every bad-input case names file:line and a reason; on_error=skip counts each skipped record.

    python -m pytest -q tests/test_data_validation.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemcut.config import DataConfig
from gemcut.data.prepare import prepare
from gemcut.errors import DataError

GOOD = {
    "text": {"text": "a perfectly fine document"},
    "prompt_completion": {"prompt": "What is 2+2?", "completion": "4"},
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "label": {"text": "great phone", "label": "pos"},
    "preference": {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."},
}


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item is a dict (dumped) or a raw string (written as is, for malformed JSON)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def fail_at(tmp_path: Path, kind: str, bad, *, labels=None, good_kind: str | None = None) -> DataError:
    """Two good records, then the bad one on line 3; returns the error prepare raises."""
    good = GOOD[good_kind or kind]
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bad])
    with pytest.raises(DataError) as info:
        prepare(DataConfig(train=[str(path)], kind=kind, labels=labels))
    err = info.value
    assert str(err).startswith(f"{path}:3: "), str(err)
    assert err.line == 3 and err.path == str(path)
    return err


CASES = [
    # (id, kind, bad record, declared labels, reason, field, words the message must contain)
    ("malformed_json", "text", '{"text": "unterminated",', None, "malformed_json", None, "not valid JSON"),
    ("missing_field", "prompt_completion", {"prompt": "What is 3+3?"}, None, "missing_field", "completion", 'field "completion" missing; found keys: prompt'),
    ("extra_field", "prompt_completion", {"prompt": "q", "completion": "a", "completon": "a"}, None, "extra_field", "completon", 'did you mean "completion"'),
    ("wrong_type", "text", {"text": 42}, None, "wrong_type", "text", 'field "text" must be a string, got int (42)'),
    ("empty_text", "text", {"text": "   "}, None, "empty_text", "text", 'field "text" is empty'),
    ("unknown_role", "messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, None,
     "unknown_role", "messages[1].role", 'did you mean "assistant"'),
    ("roles_not_alternating", "messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                        {"role": "assistant", "content": "c"}]}, None,
     "roles_not_alternating", "messages[1].role", 'messages[1] is "user" after "user"'),
    ("no_assistant_turn", "messages", {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]}, None,
     "no_assistant_turn", "messages", "no assistant turn"),
    ("label_not_declared", "label", {"text": "meh", "label": "postive"}, ["neg", "pos", "positive"], "label_not_declared", "label",
     'label "postive" is not in data.labels (neg, pos, positive). Did you mean "positive"?'),
    ("chosen_equals_rejected", "preference", {"prompt": "p", "chosen": "same answer", "rejected": "same answer "}, None,
     "chosen_equals_rejected", "rejected", "chosen and rejected are the same text"),
    ("ranking_ties", "preference", {"prompt": "p", "completions": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}, {"text": "c", "rank": 2}]},
     None, "ranking_ties", "completions[2]", "completions[1] and completions[2] share rank 2"),
    ("missing_prompt", "preference", {"chosen": "x", "rejected": "y"}, None, "missing_field", "prompt", 'field "prompt" missing'),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_record_names_file_line_and_reason(tmp_path, case):
    _, kind, bad, labels, reason, field, words = case
    err = fail_at(tmp_path, kind, bad, labels=labels or (["neg", "pos"] if kind == "label" else None))
    assert err.reason == reason
    assert err.field == field
    assert words in str(err)
    assert "on_error=skip" in str(err)  # every failure says how to go on


def test_label_outside_declared_set_lists_the_set(tmp_path):
    err = fail_at(tmp_path, "label", {"text": "meh", "label": "unknown"}, labels=["neg", "pos"])
    assert err.reason == "label_not_declared" and "(neg, pos)" in str(err)


def test_score_ties_and_identical_ranked_completions(tmp_path):
    err = fail_at(tmp_path, "preference", {"prompt": "p", "completions": [{"text": "a", "score": 0.5}, {"text": "b", "score": 0.5}]})
    assert err.reason == "ranking_ties" and "share score 0.5" in str(err)
    err = fail_at(tmp_path, "preference", {"prompt": "p", "completions": ["same", "other", "same"]})
    assert err.reason == "chosen_equals_rejected"


def test_openai_dpo_equal_outputs(tmp_path):
    bad = {"input": {"messages": [{"role": "user", "content": "q"}]},
           "preferred_output": [{"role": "assistant", "content": "a"}],
           "non_preferred_output": [{"role": "assistant", "content": "a"}]}
    assert fail_at(tmp_path, "preference", bad).reason == "chosen_equals_rejected"


def test_malformed_json_array_points_at_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": "two"}\n  {"text": "three"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(DataConfig(train=[str(path)]))
    assert str(info.value).startswith(f"{path}:4: ") and info.value.reason == "malformed_json"


def test_csv_row_with_extra_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,pos\nalso fine,neg\nbroken, with comma,pos\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(DataConfig(train=[str(path)]))
    assert str(info.value).startswith(f"{path}:4: ") and info.value.reason == "extra_field"
    assert "quote fields" in str(info.value)


def test_chatterbot_conversation_that_is_not_a_list(tmp_path):
    path = tmp_path / "trivia.yml"
    path.write_text('categories:\n- trivia\nconversations:\n- - Q one?\n  - A one\n- Q two? - A two\n- - Q three?\n  - A three\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(DataConfig(train=[str(path)]))
    assert str(info.value).startswith(f"{path}:6: ") and info.value.reason == "wrong_type"


def test_skip_counts_every_skipped_record_with_its_reason(tmp_path):
    good = GOOD["messages"]
    u, a = ({"role": "user", "content": "x"}, {"role": "assistant", "content": "y"})
    lines = [
        good,
        '{"messages": [',                                              # malformed_json
        {"messages": [u, {"role": "bot", "content": "y"}]},            # unknown_role
        {"messages": [u, u, a]},                                       # roles_not_alternating
        {"messages": [u]},                                             # no_assistant_turn
        {"messages": [u, {"role": "assistant", "content": ""}]},       # empty_text
        {"messages": "hi"},                                            # wrong_type
        {"messages": [u, a], "extra": 1},                              # extra_field
        {"messages": [{"role": "user", "content": "z"}, a]},           # good
        '{"messages": oops}',                                          # malformed_json
        "",                                                            # blank line: not a record
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", lines)
    prepared = prepare(DataConfig(train=[str(path)], on_error="skip", split={"validation": 0, "test": 0}))
    errors = prepared.report["errors"]
    assert errors["by_reason"] == {"malformed_json": 2, "unknown_role": 1, "roles_not_alternating": 1, "no_assistant_turn": 1,
                                   "empty_text": 1, "wrong_type": 1, "extra_field": 1}
    assert errors["total"] == 8
    rec = prepared.report["records"]
    assert rec["rows_read"] == 10 and rec["records_valid"] == 2 and rec["bad_records"] == 8
    assert prepared.report["sources"][0]["blank_lines"] == 1
    assert errors["examples"]["unknown_role"][0].startswith(f"{path}:3: ")
    assert len(prepared.splits["train"]) == 2
    assert any("8 bad records skipped" in w for w in prepared.report["warnings"])
