"""Hostile and surprising inputs (issue 17, items 10-11): each is read, or gets a file-named error with a fix.

    python -m pytest -q tests/test_data_hostile.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemcut.cli import app, main, register_commands
from gemcut.config import DataConfig, validate
from gemcut.data.prepare import prepare
from gemcut.errors import ConfigError, DataError

NO_SPLIT = {"validation": 0, "test": 0}
SKIP_HINT = " (or set data.on_error=skip to skip bad records, counted in the report)"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


def prep(path: Path, **kw):
    return prepare(DataConfig(train=[str(path)], split=NO_SPLIT, **kw))


def error_of(path: Path, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        prep(path, **kw)
    return info.value


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- 10: inputs that crashed with a traceback


def test_png_named_parquet_is_named_not_parsed(tmp_path):
    p = tmp_path / "img.parquet"
    p.write_bytes(PNG)
    err = error_of(p)
    assert str(err) == f"{p}: this is a PNG image, not a Parquet file; take it out of data.train" + SKIP_HINT
    assert err.reason == "binary_file"


def test_text_named_parquet_and_truncated_parquet(tmp_path):
    p = tmp_path / "t.parquet"
    p.write_text("text,label\na,b\n", encoding="utf-8")
    assert str(error_of(p)) == (f"{p}: not a Parquet file (it does not start with the Parquet magic bytes PAR1); "
                                "name the file by its format (.csv, .jsonl, ...) or set data.format" + SKIP_HINT)
    p.write_bytes(b"PAR1" + b"\x00" * 40)
    err = error_of(p)
    assert str(err).startswith(f"{p}: cannot read this Parquet file (") and err.reason == "unreadable_file"


def test_png_named_csv_fails_by_name_and_is_counted_under_skip(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "img.csv").write_bytes(PNG)
    (folder / "good.csv").write_text("text,label\nfine day,pos\nbad day,neg\n", encoding="utf-8")
    img = folder / "img.csv"
    assert str(error_of(folder)) == f"{img}: this is a PNG image, not CSV text; take it out of data.train" + SKIP_HINT
    done = prep(folder, on_error="skip")
    assert len(done.splits["train"]) == 2
    assert done.report["errors"]["by_reason"] == {"binary_file": 1}
    assert done.report["errors"]["examples"]["binary_file"] == [f"{img}: this is a PNG image, not CSV text; take it out of data.train"]


@pytest.mark.parametrize("suffix, noun", [(".jsonl", "JSONL text"), (".json", "JSON text"), (".txt", "plain text"), (".yml", "YAML text")])
def test_binary_files_under_every_text_suffix(tmp_path, suffix, noun):
    p = tmp_path / f"x{suffix}"
    p.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    assert str(error_of(p)) == (f"{p}: this is a ZIP archive (an Excel .xlsx is one), not {noun}; "
                                "save a spreadsheet as CSV, or unzip the archive" + SKIP_HINT)
    p.write_bytes(b"hello\x00\x01\x02\x03" * 20)
    assert str(error_of(p)) == f"{p}: this is binary data (it holds NUL bytes), not {noun}; take it out of data.train" + SKIP_HINT


def test_cr_only_line_endings_are_read_with_their_line_numbers(tmp_path):
    p = tmp_path / "mac.csv"
    p.write_bytes(b"text,label\rhello there,pos\r\"two\rlines\",neg\rlast one,pos\r")
    done = prep(p)
    recs = sorted(done.splits["train"], key=lambda r: r["_source"])
    assert [(r["_source"], r["text"], r["label"]) for r in recs] == [
        (f"{p}:2", "hello there", "pos"), (f"{p}:3", "two\nlines", "neg"), (f"{p}:5", "last one", "pos")]
    lf = tmp_path / "lf.csv"  # a file with LF endings: a CR inside a field is text, not a line break
    lf.write_bytes(b'text,label\n"a\rb",pos\nnext,neg\n')
    recs = sorted(prep(lf, clean={"normalize_whitespace": False}).splits["train"], key=lambda r: r["_source"])
    assert [(r["_source"], r["text"]) for r in recs] == [(f"{lf}:2", "a\rb"), (f"{lf}:3", "next")]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_fields_over_the_csv_module_limit_are_read(tmp_path, suffix, sep):
    p = tmp_path / f"big{suffix}"
    long = "word " * 40_000  # 200,000 characters: over csv's default 131,072
    p.write_text(f"text{sep}label\n{long}{sep}pos\nshort{sep}neg\n", encoding="utf-8")
    done = prep(p, clean={"normalize_whitespace": False})
    assert sorted(len(r["text"]) for r in done.splits["train"]) == [5, 200_000]


def test_json_nested_100000_deep_is_a_file_named_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    p = jsonl(tmp_path / "deep.jsonl", [{"text": "fine"}, deep])
    err = error_of(p)
    assert str(err) == f"{p}:2: JSON nested too deeply to read (Python's parser stops near 1,000 levels); flatten the record" + SKIP_HINT
    assert err.reason == "too_deep"
    assert len(prep(p, on_error="skip").splits["train"]) == 1
    q = tmp_path / "deep.json"
    q.write_text('[\n{"text": "fine"},\n' + deep + "\n]\n", encoding="utf-8")
    assert str(error_of(q)) == (f"{q}:3: JSON nested too deeply to read (Python's parser stops near 1,000 levels); flatten the record; "
                                "the rest of this file cannot be read" + SKIP_HINT)
    r = tmp_path / "deep_object.json"
    r.write_text('{"a": ' + deep + "}", encoding="utf-8")
    assert str(error_of(r)).startswith(f"{r}:1: JSON nested too deeply to read")
    y = tmp_path / "deep.yml"
    y.write_text("conversations:\n- " + "[" * 20_000 + "]" * 20_000 + "\n", encoding="utf-8")
    assert str(error_of(y)).startswith(f"{y}:1: YAML nested too deeply to read")


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        validate({"data": {"encoding": "utf-99"}})
    assert str(info.value) == ("config: data.encoding: Value error, unknown encoding 'utf-99'; use a Python codec name "
                               "such as utf-8, cp1252 or latin-1 (given: 'utf-99')")
    with pytest.raises(ConfigError, match=r"data.fallback_encodings.1: Value error, unknown encoding 'klingon'"):
        validate({"data": {"fallback_encodings": ["cp1252", "klingon"]}})


def test_generate_reads_a_latin1_prompts_file(tmp_path):
    from gemcut.label.generate import read_prompts

    p = tmp_path / "prompts.jsonl"
    p.write_bytes('{"prompt": "Un caf\u00e9, s\'il vous pla\u00eet"}\n'.encode("latin-1"))
    (item,) = read_prompts(p)
    assert item.shown == "Un caf\u00e9, s'il vous pla\u00eet" and item.source == f"{p}:1"


# ---------------------------------------------------------------- 11: silent surprises


def test_mixed_record_kinds_in_one_file_are_an_error(tmp_path):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    p = jsonl(tmp_path / "mixed.jsonl", [{"text": "a document"}, {"text": "another"}, conv, {"text": "x", "label": "pos"}])
    err = error_of(p)
    assert str(err) == (f"{p}:3: this record is messages, but the first record ({p}:1) is text, and a run reads one kind; "
                        "put each kind in its own file, or set data.kind: text to flatten every record into a document" + SKIP_HINT)
    assert err.reason == "mixed_kinds"
    skipped = prep(p, on_error="skip")
    assert skipped.report["errors"]["by_reason"] == {"mixed_kinds": 2}
    flat = prep(p, kind="text")  # declared: flattening is what was asked for
    assert len(flat.splits["train"]) == 4


def test_a_text_only_record_in_a_label_file_still_names_the_missing_label(tmp_path):
    p = jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "pos"}, {"text": "b"}])
    assert str(error_of(p)).startswith(f'{p}:2: field "label" missing; found keys: text')


def test_label_1_and_string_1_are_one_label_with_a_counted_warning(tmp_path):
    p = jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "1"}, {"text": "c", "label": 1},
                                     {"text": "d", "label": 2}])
    done = prep(p)
    assert done.labels == ["1", "2"]
    assert done.report["labels"]["spellings_merged"] == {"1": {"1": 2, '"1"': 1}}
    assert ('label "1" is written 2 ways (1 in 2 records, "1" in 1 record); they are read as one label, "1"'
            in done.report["warnings"])


def test_integer_labels_sort_numerically(tmp_path):
    p = jsonl(tmp_path / "l.jsonl", [{"text": f"t{i}", "label": i % 11} for i in range(33)])
    done = prep(p)
    want = [str(i) for i in range(11)]
    assert done.labels == want
    assert list(done.report["labels"]["after_cleaning"]["counts"]) == want
    assert list(done.report["splits"]["train"]["labels"]) == want


def test_declared_label_order_is_kept(tmp_path):
    from gemcut.data.tokenize import resolve_label_names

    p = jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "neutral"}])
    done = prep(p, labels=["pos", "neutral", "neg"])
    assert done.labels == ["pos", "neutral", "neg"]
    assert list(done.report["labels"]["after_cleaning"]["counts"]) == ["pos", "neutral", "neg"]
    assert resolve_label_names([{"label": "10"}, {"label": "9"}], None) == ["9", "10"]
    with pytest.raises(ConfigError, match=r'data.labels: Value error, "pos" is listed twice'):
        validate({"data": {"labels": ["pos", "neg", "pos"]}})
    assert validate({"data": {"labels": [1, 0]}}).data.labels == ["1", "0"]


def test_nan_scores_in_a_ranking_are_an_error(tmp_path):
    p = tmp_path / "nan.jsonl"
    p.write_text('{"prompt": "p", "completions": [{"text": "a", "score": 1.0}, {"text": "b", "score": NaN}, {"text": "c", "score": 0.5}]}\n',
                 encoding="utf-8")
    err = error_of(p)
    assert str(err) == f"{p}:1: completions[1].score is nan; give every completion a real number (higher = better)" + SKIP_HINT
    assert err.field == "completions[1].score"


def test_duplicate_json_keys_are_an_error(tmp_path):
    p = jsonl(tmp_path / "dup.jsonl", [{"text": "ok", "label": "a"}, '{"text": "first", "label": "a", "text": "second"}'])
    err = error_of(p)
    assert str(err) == f'{p}:2: key "text" appears twice in one object; JSON keeps only the last, so remove or rename one' + SKIP_HINT
    assert err.reason == "duplicate_key" and err.field == "text"
    q = tmp_path / "dup.json"
    q.write_text('[\n{"text": "ok", "label": "a"},\n{"text": "x",\n "label": "a", "label": "b"},\n{"text": "z", "label": "b"}\n]\n', encoding="utf-8")
    assert str(error_of(q)) == f'{q}:3: key "label" appears twice in one object; JSON keeps only the last, so remove or rename one' + SKIP_HINT
    done = prep(q, on_error="skip")  # the array goes on after the bad record
    assert sorted(r["text"] for r in done.splits["train"]) == ["ok", "z"]


def test_a_duplicate_key_inside_a_broken_record_stops_the_array(tmp_path):
    q = tmp_path / "dup.json"
    q.write_text('[\n{"text": "ok"},\n{"x": {"a": 1, "a": 2}, oops}\n]\n', encoding="utf-8")
    done = prep(q, on_error="skip")
    assert done.report["errors"]["by_reason"] == {"duplicate_key": 1, "malformed_json": 1}


def test_a_number_too_long_for_python_is_an_error(tmp_path):
    p = jsonl(tmp_path / "n.jsonl", [{"text": "fine", "label": 1}, '{"text": "a", "label": ' + "7" * 5000 + "}"])
    assert str(error_of(p)) == (f"{p}:2: cannot read a number in this record (Exceeds the limit (4300 digits) for integer string "
                                "conversion: value has 5000 digits); write it as a string" + SKIP_HINT)
    q = tmp_path / "n.json"
    q.write_text('[{"text": "a", "label": ' + "7" * 5000 + "}]", encoding="utf-8")
    assert str(error_of(q)).startswith(f"{q}:1: cannot read a number in this record")


def test_lone_surrogate_escapes_are_an_error(tmp_path):
    p = jsonl(tmp_path / "s.jsonl", [{"text": "fine"}, '{"text": "half \\ud800 a pair"}', '{"text": "whole \\ud83d\\ude00 pair"}'])
    assert str(error_of(p)) == (f"{p}:2: a string holds a lone surrogate \\ud800 (half of a \\u escape pair), which no file can store; "
                                "fix or drop the escape" + SKIP_HINT)
    assert sorted(r["text"] for r in prep(p, on_error="skip").splits["train"]) == ["fine", "whole \U0001f600 pair"]


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le"])
def test_utf16_files_are_named_and_readable_with_data_encoding(tmp_path, codec):
    p = tmp_path / "u16.csv"
    p.write_bytes("text,label\nsch\u00f6n,pos\nbad,neg\n".encode(codec))
    how = "it starts with a UTF-16 byte-order mark" if codec == "utf-16" else "every other byte is zero"
    err = error_of(p)
    assert str(err) == f"{p}: this file is UTF-16 ({how}); convert it to UTF-8 or set data.encoding: {codec}" + SKIP_HINT
    assert err.reason == "wrong_encoding"
    done = prep(p, encoding=codec)
    assert sorted(r["text"] for r in done.splits["train"]) == ["bad", "sch\u00f6n"]
    assert done.report["sources"][0]["lines_by_encoding"] == {codec: 3}


def test_semicolon_csv_offers_data_delimiter(tmp_path):
    p = tmp_path / "semi.csv"
    p.write_text("text;label\nbonjour;pos\nnon;neg\n", encoding="utf-8")
    err = error_of(p)
    assert str(err) == (f'{p}:1: the header is one column, "text;label", that looks semicolon-delimited; '
                        'set data.delimiter: ";"' + SKIP_HINT)
    assert err.reason == "wrong_delimiter"
    done = prep(p, delimiter=";")
    assert sorted(r["text"] for r in done.splits["train"]) == ["bonjour", "non"]
    with pytest.raises(ConfigError, match="data.delimiter: Value error, must be one character"):
        validate({"data": {"delimiter": ";;"}})


def test_unterminated_quote_names_the_line_where_it_opened(tmp_path):
    p = tmp_path / "quote.csv"
    p.write_text('text,label\nhi,pos\n"two\nlines",neg\n"oops,neg\nbye,pos\nlast,pos\n', encoding="utf-8")
    err = error_of(p)
    assert str(err) == (f'{p}:5: a quote opened on this line is never closed, so lines 5-7 were read as one field; '
                        'close it, or write a quote inside a field as ""' + SKIP_HINT)
    assert err.reason == "unterminated_quote"
    p.write_text('text,label\nhi,pos\nok,"neg', encoding="utf-8")  # no newline at the end
    assert str(error_of(p)).startswith(f"{p}:3: a quote opened on this line is never closed, so line 3 was read")


@pytest.mark.parametrize("blank, clean, reason", [
    ("\u200b", {}, "zero_width_only"), (" \u200c\u200d ", {}, "zero_width_only"), ("\u2060", {}, "zero_width_only"),
    ("\ufeff", {}, "empty_after_cleaning"),  # ftfy removes a stray byte-order mark
    ("\ufeff", {"fix_mojibake": False, "normalize_unicode": False, "normalize_whitespace": False}, "zero_width_only"),
])
def test_zero_width_completion_is_dropped_and_counted(tmp_path, blank, clean, reason):
    p = jsonl(tmp_path / "z.jsonl", [{"prompt": "q", "completion": "fine"}, {"prompt": "q2", "completion": blank}])
    done = prep(p, clean=clean)
    assert [r["completion"] for r in done.splits["train"]] == ["fine"]
    assert done.report["cleaning"]["dropped"] == {reason: 1}


def test_generate_reads_prompts_with_the_pipelines_reader_and_checks(tmp_path):
    from gemcut.label.generate import read_prompts

    p = tmp_path / "p.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "with a BOM"}\n')
    assert [i.shown for i in read_prompts(p)] == ["with a BOM"]
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bogus", "content": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_prompts(p)
    assert str(info.value) == f'{p}:1: messages[1].role "bogus" is not one of system, user, assistant, tool'
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "weight": 0}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "to be sampled"}]
    p.write_text(json.dumps({"messages": msgs}) + "\n", encoding="utf-8")
    (item,) = read_prompts(p)
    assert item.messages == msgs[:4]  # kept as read (weights too); the last assistant turn is what gets sampled
    p.write_text('{"prompt": "a", "prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r'p.jsonl:1: key "prompt" appears twice'):
        read_prompts(p)


# ---------------------------------------------------------------- the command line: exit 2 and one line, never a traceback


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["gemcut", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def test_cli_names_a_png_under_skip_and_reads_semicolons_with_delimiter(tmp_path, monkeypatch, capsys):
    p = tmp_path / "img.parquet"
    p.write_bytes(PNG)
    code, out = run_cli(["data", "check", str(p), "--on-error", "skip", "--out", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in out
    assert f"First skipped: {p}: this is a PNG image, not a Parquet file; take it out of data.train" in " ".join(out.split())
    semi = tmp_path / "semi.csv"
    semi.write_text("text;label\nbonjour;pos\nnon;neg\n", encoding="utf-8")
    code, out = run_cli(["data", "check", str(semi), "--out", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and 'set data.delimiter: ";"' in out
    register_commands()
    res = CliRunner().invoke(app, ["data", "check", str(semi), "--delimiter", ";", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "label records: train" in res.output
