"""Uploads checked by the data pipeline (gemcut/service/uploads.py): each accepted format processed with its
kind; bad lines named by line and field with the client's file name, never the server's path.

    python -m pytest -q tests/test_service_uploads.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from gemcut.service.uploads import SHOWN_BAD_LINES, validate_upload

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello", "weight": 0}, {"role": "user", "content": "how are you?"},
                     {"role": "assistant", "content": "fine"}]}
TOOLS = {
    "messages": [
        {"role": "user", "content": "weather in paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": "{\"city\": \"paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
}
DPO = {"input": {"messages": [{"role": "user", "content": "capital of france?"}]},
       "preferred_output": [{"role": "assistant", "content": "Paris."}],
       "non_preferred_output": [{"role": "assistant", "content": "Berlin."}]}
REINFORCEMENT = {"messages": [{"role": "user", "content": "2+2?"}], "reference_answer": "4", "meta": {"topic": "sums"}}


def stored(tmp_path: Path, rows: list, name: str = "file-abcdefgh12") -> Path:
    """The bytes as the service stores them: under an id, without the client's name or suffix."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def check(path: Path, filename: str = "train.jsonl"):
    result = validate_upload(path, filename, purpose="fine-tune")
    assert str(path) not in json.dumps([result.status_details, result.counts]), "the server's path leaked"
    return result


def numbered(rows: list[dict]) -> list[dict]:
    """Distinct copies of rows (the pipeline drops exact duplicates): each one's first user turn, text or
    prompt ends with its number."""
    out = []
    for i, row in enumerate(rows):
        row = copy.deepcopy(row)
        holder = row.get("input", row)
        if "messages" in holder:
            next(m for m in holder["messages"] if m["role"] == "user")["content"] += f" ({i})"
        else:
            row["text" if "text" in row else "prompt"] += f" ({i})"
        out.append(row)
    return out


@pytest.mark.parametrize("rows, kind", [
    ([CHAT, TOOLS], "messages"),
    ([DPO, DPO], "preference"),
    ([{"text": "great stuff", "label": "positive"}, {"text": "awful", "label": "negative"}], "label"),
    ([{"text": "A document."}, {"text": "Another one."}], "text"),
    ([{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}], "prompt_completion"),
], ids=["chat-sft", "dpo", "label", "text", "prompt_completion"])
def test_each_accepted_format_is_processed_with_its_kind(tmp_path, rows, kind):
    result = check(stored(tmp_path, numbered(rows * 3)))
    assert (result.status, result.status_details, result.kind) == ("processed", None, kind)
    assert result.counts["rows"] == 6 and result.counts["records"] == 6 and result.counts["examples"] == 6
    assert "item_fields" not in result.counts


def test_reinforcement_rows_keep_their_extra_fields_as_items(tmp_path):
    result = check(stored(tmp_path, numbered([REINFORCEMENT] * 4)))
    assert (result.status, result.kind) == ("processed", "messages")
    assert result.counts["item_fields"] == ["meta", "reference_answer"]
    assert result.counts["without_reply"] == 4


def test_a_bad_line_is_named_by_line_and_field_with_the_clients_name(tmp_path):
    bad = json.loads(json.dumps(CHAT))
    bad["messages"][2]["role"] = "bot"
    result = check(stored(tmp_path, numbered([CHAT, CHAT]) + [bad]), "my chats.jsonl")
    assert result.status == "error" and result.kind == "messages"
    first, second = result.status_details.splitlines()[:2]
    assert first.startswith("my chats.jsonl: 1 of 3 lines")
    assert second.startswith("line 3: ") and "messages[2].role" in second and '"bot"' in second and 'did you mean "assistant"' in second
    assert result.counts == {"rows": 3, "bad_lines": 1, "bad_by_reason": {"unknown_role": 1}}


def test_a_missing_field_is_named(tmp_path):
    result = check(stored(tmp_path, [{"text": "no label here", "label": "a"}, {"text": "x"}, {"label": "b"}]))
    lines = result.status_details.splitlines()
    assert result.status == "error" and len(lines) == 3
    assert lines[1].startswith("line 2: ") and '"label"' in lines[1]
    assert lines[2].startswith("line 3: ") and '"text"' in lines[2]


def test_several_bad_lines_show_the_first_few_and_count_the_rest(tmp_path):
    rows = numbered([CHAT] * 3) + ["{not json"] * 4 + [{"messages": [{"role": "user", "content": "only a question"}]}] * 5
    result = check(stored(tmp_path, rows))
    lines = result.status_details.splitlines()
    assert lines[0] == "train.jsonl: 9 of 12 lines are not valid training examples:"
    assert [line.split(":")[0] for line in lines[1:1 + SHOWN_BAD_LINES]] == [f"line {n}" for n in (4, 5, 6, 7, 8)]
    assert lines[-1] == "... and 4 more bad lines (all 9 by reason: no_assistant_turn 5, malformed_json 4)"
    assert result.counts["bad_by_reason"] == {"malformed_json": 4, "no_assistant_turn": 5}


def test_an_empty_or_blank_file_is_an_error(tmp_path):
    for content in ("", "\n\n  \n"):
        path = tmp_path / "file-empty12345"
        path.write_text(content, encoding="utf-8")
        result = check(path)
        assert result.status == "error" and "holds no records" in result.status_details and "JSONL" in result.status_details


def test_fine_tune_files_are_jsonl_only(tmp_path):
    csv = tmp_path / "file-csv1234567"
    csv.write_text("text,label\nhello,a\n", encoding="utf-8")
    named = check(csv, "data.csv")
    assert named.status == "error" and "JSONL only (OpenAI's rule)" in named.status_details and "data.csv" in named.status_details
    as_text = check(csv, "data.txt")  # not named as another format: read as JSONL, which it is not
    assert as_text.status == "error" and as_text.status_details.splitlines()[1].startswith("line 1: not valid JSON")
    assert "JSONL only (OpenAI's rule)" in as_text.status_details
    array = stored(tmp_path, ["[" + json.dumps(CHAT) + ",", json.dumps(CHAT) + "]"])
    assert check(array, "data.json").status == "error"


def test_a_binary_file_is_named_for_what_it_is(tmp_path):
    png = tmp_path / "file-png1234567"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    result = check(png, "cat.jsonl")
    assert result.status == "error" and "PNG image" in result.status_details


def test_other_purposes_are_refused(tmp_path):
    result = validate_upload(stored(tmp_path, [CHAT]), "batch.jsonl", purpose="batch")
    assert result.status == "error" and "purpose='fine-tune'" in result.status_details


def test_latin1_and_mojibake_are_counted_not_errors(tmp_path):
    path = tmp_path / "file-latin123456"
    lines = [json.dumps({"text": "caf\u00e9 ol\u00e9", "label": "a"}, ensure_ascii=False).encode("latin-1"),  # latin-1 bytes
             json.dumps({"text": "na\u00c3\u00afve", "label": "b"}, ensure_ascii=False).encode("utf-8"),  # mojibake of "naïve"
             json.dumps({"text": "plain", "label": "a"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = check(path, "tweets.jsonl")
    assert (result.status, result.kind) == ("processed", "label")
    assert result.counts["fallback_lines"] == 1 and result.counts["lines_by_encoding"] == {"cp1252": 1, "utf-8": 2}
    assert result.counts["mojibake_repaired"] == 1
    assert any(w.startswith("tweets.jsonl: 1 lines were not valid utf-8") for w in result.counts["warnings"])
    assert result.counts["labels"] == {"a": 2, "b": 1}


def test_duplicates_are_counted_as_skipped(tmp_path):
    result = check(stored(tmp_path, [CHAT, CHAT, TOOLS]))
    assert result.status == "processed"
    assert result.counts["records"] == 3 and result.counts["examples"] == 2 and result.counts["skipped"] == {"exact_duplicate": 1}


def test_a_file_name_cannot_smuggle_a_path_or_control_characters(tmp_path):
    bad = {"messages": [{"role": "usr", "content": "x"}]}
    result = check(stored(tmp_path, [bad]), "../../etc/evil\nname.jsonl")
    assert result.status_details.startswith("evil?name.jsonl: 1 of 1 lines")


def test_a_missing_stored_file_is_the_servers_fault_not_the_uploaders(tmp_path):
    with pytest.raises(FileNotFoundError):
        validate_upload(tmp_path / "file-gone1234567", "train.jsonl", purpose="fine-tune")
