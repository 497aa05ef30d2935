"""Export of rankings as preference pairs (gemcut and OpenAI DPO formats), `gemcut generate` and the CLI."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from tiny import save_tiny_llama
from typer.testing import CliRunner

from gemcut.errors import DataError
from gemcut.label.export import export_preferences, ranking_pairs, to_openai
from gemcut.label.store import LabelStore, RankingRow


def test_all_ordered_pairs_of_a_ranking():
    row = RankingRow(7, 3, "Name a colour.", "alice", dt.datetime(2024, 5, 1, 12, 0), ["red", "blue", "green", "mauve"])
    pairs = list(ranking_pairs(row))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("red", "blue"), ("red", "green"), ("red", "mauve"), ("blue", "green"), ("blue", "mauve"), ("green", "mauve")]
    assert all(p["_labeler"] == "alice" and p["_ranked_at"] == "2024-05-01T12:00:00Z" and p["_ranking_id"] == 7 for p in pairs)
    assert [(p["_chosen_rank"], p["_rejected_rank"]) for p in pairs][:2] == [(1, 2), (1, 3)]


def test_openai_format():
    rec = {"prompt": "hi?", "chosen": "hello!", "rejected": "go away", "_labeler": "bob", "_ranked_at": "2024-01-01T00:00:00Z"}
    assert to_openai(rec) == {
        "input": {"messages": [{"role": "user", "content": "hi?"}]},
        "preferred_output": [{"role": "assistant", "content": "hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "go away"}],
        "metadata": {"labeler": "bob", "ranked_at": "2024-01-01T00:00:00Z"},
    }


def test_export_from_the_store(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 'q.db'}")
    store.add_prompt("p1", ["x", "y", "z"])
    store.add_prompt("p2", ["u", "v"])
    for name in ("alice", "bob"):
        t = store.next_task(name)
        store.submit_ranking(name, t.prompt_id, [c for c, _ in t.completions][::-1])
    counts = export_preferences(store, tmp_path / "out.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert counts == {"rankings": 2, "pairs": 4, "path": str(tmp_path / "out.jsonl"), "format": "gemcut"}
    assert len(rows) == 4 and {r["_labeler"] for r in rows} == {"alice", "bob"}
    assert all(r["chosen"] != r["rejected"] for r in rows)
    with pytest.raises(DataError, match="unknown export format"):
        export_preferences(store, tmp_path / "x.jsonl", "csv")


def test_generate_and_export_through_the_cli(tmp_path):
    from gemcut.cli import app, register_commands

    register_commands()
    model_dir = save_tiny_llama(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "what is the capital of france?"}\n{"text": "the quick brown"}\n'
                       '{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "drop me"}]}\n')
    db = f"sqlite:///{tmp_path / 'q.db'}"
    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(model_dir), str(prompts), "--n", "3", "--seed", "1", "--max-new-tokens", "6", "--db", db])
    assert res.exit_code == 0, res.output
    assert "queued 3 of 3 prompts (9 completions)" in res.output
    store = LabelStore(db)
    t = store.next_task("alice")
    assert t.prompt == "what is the capital of france?" and len(t.completions) == 3
    store.submit_ranking("alice", t.prompt_id, [c for c, _ in t.completions])
    # The same seed queues the same completions again.
    res = runner.invoke(app, ["generate", str(model_dir), str(prompts), "--n", "3", "--seed", "1", "--max-new-tokens", "6",
                              "--db", f"sqlite:///{tmp_path / 'q2.db'}"])
    again = LabelStore(f"sqlite:///{tmp_path / 'q2.db'}").next_task("alice")
    assert sorted(x for _, x in again.completions) == sorted(x for _, x in t.completions)
    out = tmp_path / "prefs.jsonl"
    res = runner.invoke(app, ["label", "--db", db, "export", "--out", str(out), "--format", "openai"])
    assert res.exit_code == 0, res.output
    assert "wrote 3 pairs from 1 rankings" in res.output
    back = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(back) == 3 and all(r["input"]["messages"][-1]["content"] == t.prompt for r in back)


def test_generate_refuses_bad_prompt_files(tmp_path):
    from gemcut.label.generate import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"question": "where is the prompt?"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt' missing or empty \(found: question\)"):
        read_prompts(f)


@pytest.mark.parametrize("fmt", ["gemcut", "openai"])
def test_the_export_is_a_training_file_for_the_data_pipeline(tmp_path, fmt):
    from gemcut.config import DataConfig
    from gemcut.data.prepare import prepare

    store = LabelStore(f"sqlite:///{tmp_path / 'q.db'}")
    for i in range(5):
        store.add_prompt(f"prompt {i}", [f"best {i}", f"middle {i}", f"worst {i}"])
        t = store.next_task("alice")
        by_text = {text: cid for cid, text in t.completions}
        store.submit_ranking("alice", t.prompt_id, [by_text[f"{w} {i}"] for w in ("best", "middle", "worst")])
    out = tmp_path / f"prefs_{fmt}.jsonl"
    export_preferences(store, out, fmt)
    prepared = prepare(DataConfig(train=[str(out)], split={"validation": 0.0, "test": 0.0}), None)
    assert prepared.kind == "preference"
    recs = prepared.splits["train"]
    assert len(recs) == 15 and all(r["chosen"].split()[0] in ("best", "middle") for r in recs)
    # Bad pairs get the pipeline's file:line error (identical chosen and rejected).
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: chosen and rejected are the same text"):
        prepare(DataConfig(train=[str(bad)]), None)
