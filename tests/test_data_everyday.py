"""Everyday data problems (issue 18, items 1, 2, 11 and mixed sources from 3): cleaning that keeps code,
markdown and generics; splits by a stable record id, per file; the packaged chatterbot corpus with the
defaults; a CSV and a JSONL in one run.

    python -m pytest -q tests/test_data_everyday.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemcut.config import CleanConfig, DataConfig
from gemcut.data import clean as cleanlib
from gemcut.data.clean import Cleaner
from gemcut.data.prepare import prepare
from gemcut.errors import DataError

NO_SPLIT = {"validation": 0, "test": 0}
CODE = ("Sure. Here's quicksort in Python:\n\n```\ndef quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n"
        "    pivot = arr[0]  # the first\n    return quicksort([x for x in arr[1:] if x < pivot]) + [pivot]\n```\n")
GENERICS = ("Use List<T> or Map<String, List<Integer>>; render <MyComponent /> with props.\n"
            "Checkpoints are in runs/<name>/, and the header is Bearer <key>. Box<A> and a <b>bold</b> word &amp; more.")


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(args: list[str], cwd: Path, monkeypatch):
    from gemcut.cli import app, register_commands

    register_commands()
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args)


# ---------------------------------------------------------------- 1: cleaning per kind of text


def test_code_keeps_its_indentation_and_html_looking_text():
    c = Cleaner(CleanConfig())
    conv = {"messages": [{"role": "user", "content": "can you write a sorting algorithm?  \r\n"},
                         {"role": "assistant", "content": CODE + "\n\n\n\n\nDone.   "}], "_source": "coding.yml:5"}
    out = c.clean(conv)
    assert out["messages"][0]["content"] == "can you write a sorting algorithm?"
    assert out["messages"][1]["content"] == CODE + "\n\nDone."  # 5 blank lines -> 2; indentation and inner spaces kept
    code_like = "template <typename T>\nclass Box {\n    T value;  // <b>not markup</b> here\n};\n"
    assert c.clean({"prompt": "p", "completion": code_like})["completion"] == code_like.rstrip("\n")


def test_html_is_stripped_only_where_it_is_markup():
    c = Cleaner(CleanConfig())
    out = c.clean({"prompt": "q", "completion": GENERICS, "_source": "g.jsonl:1"})
    assert out["completion"] == ("Use List<T> or Map<String, List<Integer>>; render <MyComponent /> with props.\n"
                                 "Checkpoints are in runs/<name>/, and the header is Bearer <key>. Box<A> and a bold word & more.")
    md = ("# Notes\n\nSome <em>emphasis</em> and `<div>` in code.\n\n```html\n<div class=\"x\">kept</div>\n```\n"
          "<p>para</p><!-- note -->\nA&#39;s &copy=2 and a <br> break")
    assert c.clean({"text": md})["text"] == ("# Notes\n\nSome emphasis and `<div>` in code.\n\n```html\n<div class=\"x\">kept</div>\n```\n"
                                               "\npara\n\nA's &copy=2 and a\n break")
    assert c.clean({"text": "usage: cmd <input> <output>, see <title>"})["text"] == "usage: cmd <input> <output>, see <title>"


def test_label_text_is_fully_normalised():
    c = Cleaner(CleanConfig())
    out = c.clean({"text": "  so   <b>happy</b>\t&amp; tired \n\n\n\n ok ", "label": "pos"})
    assert out["text"] == "so happy & tired\n\nok"


def test_every_change_is_counted_by_reason_with_the_whole_changed_region():
    c = Cleaner(CleanConfig())
    long_tail = "x" * 300
    c.clean({"text": "a" * 300 + " <b>bold</b> " + long_tail + "  \n", "_source": "t.txt:1"})
    c.clean({"prompt": "q\r\nr", "completion": "fine &amp; dandy", "_source": "p.jsonl:1"})
    s = c.summary()
    assert s["changes"] == {"html_tags_removed": 1, "trailing_whitespace_trimmed": 1, "line_endings_unified": 1, "html_entities_decoded": 1}
    assert s["changed"] == {"fix_mojibake": 0, "strip_html": 2, "normalize_unicode": 0, "normalize_whitespace": 2}
    (ex,) = s["examples"]["html_tags_removed"]
    assert ex == {"source": "t.txt:1", "field": "text",
                  "before": "…" + "a" * 39 + " <b>bold</b> " + "x" * 39 + "…", "after": "…" + "a" * 39 + " bold " + "x" * 39 + "…"}
    assert s["examples"]["line_endings_unified"][0] == {"source": "p.jsonl:1", "field": "prompt", "before": "q\r\nr", "after": "q\nr"}


def test_changed_region_shows_first_to_last_change():
    before = "keep " * 20 + "A" + "m" * 500 + "B" + " keep" * 20
    after = "keep " * 20 + "a" + "m" * 500 + "b" + " keep" * 20
    b, a = cleanlib.changed_region(before, after, context=5)
    assert b == "…keep A" + "m" * 500 + "B keep…" and a == "…keep a" + "m" * 500 + "b keep…"
    assert cleanlib.changed_region("same", "same") == ("same", "same")


@pytest.mark.smoke
def test_packaged_chatterbot_code_keeps_its_indentation():
    prep = prepare(DataConfig(train=["chatterbot"], split=NO_SPLIT))
    sorts = [r for r in prep.splits["train"] if r["messages"][0]["content"] == "can you write a sorting algorithm?"]
    assert "\n    if len(arr) <= 1:\n        return arr\n" in sorts[0]["messages"][1]["content"]


# ---------------------------------------------------------------- 2: splits by a stable record id, per file


def _membership(prep) -> dict[str, str]:
    return {r["_source"]: s for s in ("train", "validation", "test") for r in prep.splits[s]}


@pytest.mark.parametrize("kind", ["prompt_completion", "text"])
def test_cleaning_settings_do_not_move_records_between_splits(tmp_path, kind):
    rows = [{"prompt": f"question   {hashlib.md5(str(i).encode()).hexdigest()} <b>x</b>", "completion": f"answer  {i}"} for i in range(200)]
    rows += [{**r, "completion": r["completion"] + "  "} for r in rows[:10]]  # duplicates once trailing spaces are trimmed
    p = jsonl(tmp_path / "d.jsonl", rows)
    a = _membership(prepare(DataConfig(train=[str(p)], kind=kind)))
    b = _membership(prepare(DataConfig(train=[str(p)], kind=kind, clean={"strip_html": False, "normalize_whitespace": False})))
    assert len(a) == 200 and len(b) > 200 and set(a.values()) == {"train", "validation", "test"}
    moved = sum(a[k] != b[k] for k in a.keys() & b.keys())  # (b's leakage check drops train copies of evaluation records)
    # Streamed, a record's split is its id's alone; in memory, the 10 records only the second run keeps may
    # shift the per-split cut by as many ids (plus one for rounding), and nothing else moves.
    assert moved == 0 if kind == "text" else moved <= 11
    moved_dir = tmp_path / "elsewhere"
    moved_dir.mkdir()
    (moved_dir / "d.jsonl").write_bytes(p.read_bytes())
    c = _membership(prepare(DataConfig(train=[str(moved_dir / "d.jsonl")], kind=kind)))
    assert {k.rsplit(":", 1)[1]: v for k, v in a.items()} == {k.rsplit(":", 1)[1]: v for k, v in c.items()}  # the id is relative


@pytest.mark.parametrize("kind", ["prompt_completion", "text"])
def test_exact_duplicates_share_a_split_and_near_duplicates_never_leak(tmp_path, kind):
    rows = [{"prompt": f"question number {i} about the weather today", "completion": f"answer {i}"} for i in range(60)] * 3
    rows += [{"prompt": f"question number {i} about the weather today!", "completion": f"answer {i}"} for i in range(60)]
    p = jsonl(tmp_path / "dup.jsonl", rows)
    prep = prepare(DataConfig(train=[str(p)], kind=kind, clean={"dedup_exact": False}))
    where: dict[str, set] = {}
    for s in ("validation", "test"):
        for r in prep.splits[s]:
            where.setdefault(json.dumps({k: v for k, v in r.items() if k != "_source"}), set()).add(s)
    assert where and all(len(v) == 1 for v in where.values())
    exact = {json.dumps({k: v for k, v in r.items() if k != "_source"}) for r in prep.splits["train"]}
    assert not exact & set(where)
    assert prep.report["leakage"]["removed_from_train"] > 0  # the near copies ("today!") of evaluation records


def test_a_small_folder_keeps_every_file_in_train_and_reports_per_file(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    for name in ("a", "b", "c"):
        (d / f"{name}.md").write_text(f"# {name}\n\nsome notes about {name}\n", encoding="utf-8")
    jsonl(d / "pairs.jsonl", [{"text": hashlib.md5(str(i).encode()).hexdigest()} for i in range(100)])
    prep = prepare(DataConfig(train=[str(d)]))
    by_file = prep.report["splits_by_file"]
    for name in ("a", "b", "c"):
        assert by_file[f"{d}/{name}.md"] == {"train": 1, "validation": 0, "test": 0}
    pairs = by_file[f"{d}/pairs.jsonl"]
    assert sum(pairs.values()) == 100 and pairs["validation"] and pairs["test"]  # a file of many records is spread
    single = prepare(DataConfig(train=[str(d / "a.md")]))
    assert single.counts() == {"train": 1, "validation": 0, "test": 0}


@pytest.mark.parametrize("suffix", [".md", ".jsonl"])
def test_a_large_folder_of_one_record_files_still_gets_evaluation_files(tmp_path, suffix):
    from gemcut.data.split import SMALL_RUN_FILES

    d = tmp_path / "docs"
    d.mkdir()
    for i in range(2 * SMALL_RUN_FILES):
        body = f"# note {i}\n\n{hashlib.md5(str(i).encode()).hexdigest()}\n"
        if suffix == ".md":
            (d / f"n{i:02d}.md").write_text(body, encoding="utf-8")  # text: the streaming path
        else:
            jsonl(d / f"n{i:02d}.jsonl", [{"prompt": f"note {i}?", "completion": body}])  # in memory
    prep = prepare(DataConfig(train=[str(d)], split={"validation": 0.2, "test": 0.2}))
    counts = prep.counts()
    assert sum(counts.values()) == 2 * SMALL_RUN_FILES and counts["validation"] > 0 and counts["test"] > 0
    assert prep.report["files_kept_in_train"] == 0


def test_check_shows_records_per_file(tmp_path, monkeypatch):
    jsonl(tmp_path / "one.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)])
    jsonl(tmp_path / "two.jsonl", [{"prompt": f"r{i}", "completion": f"b{i}"} for i in range(10)])
    res = cli(["data", "check", "one.jsonl", "two.jsonl", "--out", "rep"], tmp_path, monkeypatch)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "data_report.json").read_text())
    lines = [" ".join(line.replace("│", " ").split()) for line in res.output.splitlines()]
    for f, counts in rep["splits_by_file"].items():
        assert f"{f} {counts['train']} {counts['validation']} {counts['test']}" in lines


# ---------------------------------------------------------------- 11: chatterbot with the defaults


TRIVIA_35 = ('chatterbot/trivia.yml:35: a conversation must be a list of lines (user, assistant, user, ...), got one text, '
             '"In a game of bingo, which number is represented by the phrase \\"two little ducks\\"? - \'22\'"; start a '
             'conversation with "- - " and each further line with "  - " (skipped and counted even with on_error=fail: '
             'the other 260 conversations of this file are well-formed)')


@pytest.mark.smoke
def test_packaged_chatterbot_passes_with_the_defaults_and_counts_its_malformed_entry(tmp_path, monkeypatch):
    prep = prepare(DataConfig(train=["chatterbot"]))
    err = prep.report["errors"]
    assert err["by_reason"] == {"wrong_type": 1} and err["tolerated"] == 1 and err["policy"] == "fail"
    assert err["examples"]["wrong_type"] == [TRIVIA_35]
    assert ("1 malformed entry skipped even with on_error=fail (one bad item in an otherwise well-formed file): wrong_type 1"
            in prep.report["warnings"])
    res = cli(["data", "check", "chatterbot"], tmp_path, monkeypatch)
    assert res.exit_code == 0, res.output


def test_a_file_of_malformed_conversations_still_fails(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("conversations:\n- Hello\n  - Hi\n- - How are you?\n  - Fine\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(DataConfig(train=[str(p)], split=NO_SPLIT))
    assert str(info.value) == (f'{p}:2: a conversation must be a list of lines (user, assistant, user, ...), got one text, "Hello - Hi"; '
                               'start a conversation with "- - " and each further line with "  - " '
                               "(or set data.on_error=skip to skip bad records, counted in the report)")


def test_cli_hint_names_the_flag(tmp_path, monkeypatch, capsys):
    from gemcut.cli import main

    jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q2"}])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["gemcut", "data", "check", "d.jsonl"])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    assert info.value.code == 2
    assert " ".join((out.out + out.err).split()) == ('error: d.jsonl:2: field "completion" missing; found keys: prompt; add it or map your field '
                                            "with data.columns (or run again with --on-error skip to skip bad records, counted in the report)")


# ---------------------------------------------------------------- 3: mixed sources


def test_a_csv_and_a_jsonl_of_one_kind_are_read_together(tmp_path):
    csv = tmp_path / "tweets.csv"
    csv.write_text("tweet,sentiment\nlove it,pos\nhate it,neg\n", encoding="utf-8")
    js = jsonl(tmp_path / "more.jsonl", [{"text": "great stuff", "label": "pos"}, {"text": "awful stuff", "label": "neg"}])
    prep = prepare(DataConfig(train=[str(csv), str(js)], columns={"text": "tweet", "label": "sentiment"}, split=NO_SPLIT))
    assert prep.kind == "label"
    assert sorted((r["text"], r["label"]) for r in prep.splits["train"]) == [
        ("awful stuff", "neg"), ("great stuff", "pos"), ("hate it", "neg"), ("love it", "pos")]
    assert set(prep.report["splits_by_file"]) == {str(csv), str(js)}


def test_sources_of_different_kinds_name_both_files_and_the_fix(tmp_path):
    csv = tmp_path / "tweets.csv"
    csv.write_text("text,label\nlove it,pos\n", encoding="utf-8")
    js = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    for on_error in ("fail", "skip"):
        with pytest.raises(DataError) as info:
            prepare(DataConfig(train=[str(csv), str(js)], on_error=on_error))
        assert str(info.value) == (f"{js}:1: this file holds messages records, but {csv} holds label records (from {csv}:2), and a run "
                                   "reads one kind; train each file in its own run (take one out of data.train), or set data.kind: text "
                                   "to flatten both into documents")
        assert info.value.reason == "mixed_kinds"
