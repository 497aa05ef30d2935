"""A chat prompt travels intact: prompts file -> gemcut generate -> store -> ranking -> export -> prepare -> DPO ids.

    python -m pytest -q tests/test_preference_chats.py

The prompt's messages are kept as structured data in the labeling store, shown as role-labelled blocks on the
ranking page, exported as the preference record's prompt (gemcut `messages` or OpenAI `input.messages`), and
rendered for DPO and reward training exactly as `gemcut generate` rendered them to sample: the prompt token
ids at training equal `gemcut.label.generate.prompt_ids`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import threading
import time

import pytest
from tiny import tiny_llama, tiny_tokenizer

from gemcut.config import DataConfig
from gemcut.data.collate import IGNORE
from gemcut.data.normalize import Normalizer
from gemcut.data.prepare import prepare
from gemcut.data.readers import Row
from gemcut.data.templates import ChatTemplate
from gemcut.data.tokenize import tokenize_records
from gemcut.errors import DataError
from gemcut.label.export import export_preferences, ranking_pairs, to_openai
from gemcut.label.generate import prompt_ids, queue_completions, read_prompts
from gemcut.label.store import LabelStore, RankingRow
from gemcut.tasks import TASKS

SYSTEM = {"role": "system", "content": "answer the question briefly."}
CHAT = [SYSTEM, {"role": "user", "content": "what is the capital of france?"},
        {"role": "assistant", "content": "paris."}, {"role": "user", "content": "and the weather?"}]


def normalize(value):
    return Normalizer().normalize(Row("p.jsonl", 1, value))[0]


# ---------------------------------------------------------------- the preference kind takes messages


def test_a_preference_prompt_may_be_a_conversation():
    recs = normalize({"messages": CHAT, "chosen": "okay today.", "rejected": "the quick brown fox."})
    assert recs == [{"messages": CHAT, "chosen": "okay today.", "rejected": "the quick brown fox.", "_source": "p.jsonl:1"}]
    ranked = normalize({"messages": CHAT, "completions": ["okay.", "sunny.", "no."]})
    assert [(r["messages"], r["chosen"], r["rejected"]) for r in ranked] == [
        (CHAT, "okay.", "sunny."), (CHAT, "okay.", "no."), (CHAT, "sunny.", "no.")]
    # A system + one user turn is the plain single-turn record (rendered the same).
    assert normalize({"messages": CHAT[:2], "chosen": "paris.", "rejected": "rome."}) == [
        {"prompt": CHAT[1]["content"], "system": SYSTEM["content"], "chosen": "paris.", "rejected": "rome.", "_source": "p.jsonl:1"}]


def test_openai_dpo_keeps_a_multi_turn_input():
    rec = {"input": {"messages": CHAT}, "preferred_output": [{"role": "assistant", "content": "okay today."}],
           "non_preferred_output": [{"role": "assistant", "content": "the quick brown fox."}]}
    assert normalize(rec) == [{"messages": CHAT, "chosen": "okay today.", "rejected": "the quick brown fox.", "_source": "p.jsonl:1"}]


@pytest.mark.parametrize("value, field, reason, message", [
    ({"messages": CHAT[:3], "chosen": "a", "rejected": "b"}, "messages[2].role", "roles_not_alternating",
     'messages ends with an "assistant" turn; chosen and rejected answer the last user turn, so end the prompt with it'),
    ({"input": {"messages": CHAT, "tools": []}, "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": "b"}]}, "input.tools", "extra_field",
     "input.tools: preference records do not take tools yet; remove them (input holds messages only)"),
    ({"messages": CHAT, "prompt": "x", "chosen": "a", "rejected": "b"}, "prompt", "extra_field",
     'a preference record has either "prompt" (with "system") or "messages", not both; keep one'),
], ids=["ends_with_assistant", "openai_tools", "prompt_and_messages"])
def test_bad_preference_conversations(value, field, reason, message):
    with pytest.raises(DataError) as info:
        normalize(value)
    assert str(info.value) == "p.jsonl:1: " + message
    assert (info.value.field, info.value.reason) == (field, reason)


def test_dpo_renders_the_conversation_with_the_template():
    tok = tiny_tokenizer()
    tmpl = ChatTemplate.from_tokenizer(tok)
    rec = {"messages": CHAT, "chosen": "okay today.", "rejected": "the quick brown fox.", "_source": "p.jsonl:1"}
    for task in ("dpo", "reward"):
        [ex], _ = tokenize_records([rec], "preference", tok, tmpl, DataConfig(), TASKS[task])
        prompt = tmpl.prompt_ids(CHAT)
        assert ex["chosen_input_ids"][:len(prompt)] == ex["rejected_input_ids"][:len(prompt)] == prompt
        assert ex["chosen_labels"][:len(prompt)] == [IGNORE] * len(prompt)  # the whole conversation is prompt
        assert tok.decode([t for t in ex["chosen_labels"] if t != IGNORE]) == "okay today.<|im_end|>"


# ---------------------------------------------------------------- the store


def test_the_store_keeps_messages_and_an_old_database_is_migrated(tmp_path):
    db = tmp_path / "q.db"
    old = LabelStore(f"sqlite:///{db}")
    old.add_prompt("an old text prompt", ["x", "y"])
    old.engine.dispose()
    with sqlite3.connect(db) as conn:  # the table as it was before the messages column
        conn.execute("ALTER TABLE label_prompts DROP COLUMN messages")
    store = LabelStore(f"sqlite:///{db}")
    pid = store.add_prompt("shown text", ["a", "b"], messages=CHAT, source="p.jsonl:2")
    first = store.next_task("alice")
    assert (first.prompt, first.messages) == ("an old text prompt", None)
    store.submit_ranking("alice", first.prompt_id, [c for c, _ in first.completions])
    task = store.next_task("alice")
    assert (task.prompt_id, task.prompt, task.messages) == (pid, "shown text", CHAT)
    store.submit_ranking("alice", pid, [c for c, _ in task.completions])
    rows = list(store.rankings())
    assert [r.messages for r in rows] == [None, CHAT]


def test_export_writes_the_messages_as_the_prompt():
    row = RankingRow(7, 3, "shown text", "alice", dt.datetime(2024, 5, 1, 12, 0), ["okay.", "no."], messages=CHAT)
    [pair] = list(ranking_pairs(row))
    assert pair == {"messages": CHAT, "chosen": "okay.", "rejected": "no.", "_labeler": "alice",
                    "_ranked_at": "2024-05-01T12:00:00Z", "_prompt_id": 3, "_ranking_id": 7, "_chosen_rank": 1, "_rejected_rank": 2}
    assert to_openai(pair) == {
        "input": {"messages": CHAT},
        "preferred_output": [{"role": "assistant", "content": "okay."}],
        "non_preferred_output": [{"role": "assistant", "content": "no."}],
        "metadata": {"labeler": "alice", "ranked_at": "2024-05-01T12:00:00Z", "prompt_id": 3, "ranking_id": 7},
    }
    # A row without messages (a text prompt, or a database from before) exports its text as before.
    old = RankingRow(8, 4, "Name a colour.", "bob", dt.datetime(2024, 5, 1, 12, 0), ["mauve", "red"])
    assert next(ranking_pairs(old))["prompt"] == "Name a colour."
    assert to_openai({"prompt": "hi?", "system": "be brief.", "chosen": "a", "rejected": "b"})["input"] == {
        "messages": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi?"}]}


def test_the_api_hands_out_the_messages(tmp_path):
    from fastapi.testclient import TestClient

    from gemcut.label.app import create_app

    store = LabelStore(f"sqlite:///{tmp_path / 'q.db'}")
    store.add_prompt("shown", ["a", "b"], messages=CHAT)
    client = TestClient(create_app(store), base_url="http://127.0.0.1")
    body = client.get("/label/api/next", headers={"X-Labeler": "alice"}).json()
    assert body["messages"] == CHAT and body["prompt"] == "shown"


# ---------------------------------------------------------------- the round trip


PROMPTS = [
    {"messages": [SYSTEM, {"role": "user", "content": "what is the capital of france?"}]},
    {"messages": CHAT},
    {"messages": CHAT + [{"role": "assistant", "content": "a trailing reply is what gets sampled"}]},
    {"prompt": "hello world", "system": "be brief."},
    {"prompt": "the quick brown fox"},
]


@pytest.mark.parametrize("fmt", ["gemcut", "openai"])
def test_round_trip_prompt_ids_equal_the_sampled_ones(tmp_path, fmt):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    items = read_prompts(path)
    assert items[1].messages == CHAT and items[2].messages == CHAT
    tok = tiny_tokenizer()
    tmpl = ChatTemplate.from_tokenizer(tok)
    store = LabelStore(f"sqlite:///{tmp_path / 'q.db'}")
    counts = queue_completions(store, tiny_llama(tok), tok, tmpl, items, n=3, temperature=1.0, top_p=1.0, seed=0,
                               max_new_tokens=6, model_name="tiny")
    assert counts["queued"] == len(PROMPTS)
    while (task := store.next_task("alice")) is not None:  # rank through the store's API
        store.submit_ranking("alice", task.prompt_id, [c for c, _ in task.completions])
    out = tmp_path / f"prefs_{fmt}.jsonl"
    export_preferences(store, out, fmt)
    exported = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    first = exported[0]["messages"] if fmt == "gemcut" else exported[0]["input"]["messages"]
    assert first == PROMPTS[0]["messages"]

    prepared = prepare(DataConfig(train=[str(out)], split={"validation": 0, "test": 0}))
    expected = {tuple(prompt_ids(item, tok, tmpl)) for item in items}  # prompts 2 and 3 sample from the same ids
    assert len(expected) == 4
    for task in ("dpo", "reward"):
        examples, _ = tokenize_records(prepared.splits["train"], "preference", tok, tmpl, DataConfig(max_length=512), TASKS[task])
        seen = set()
        for ex in examples:
            for side in ("chosen", "rejected"):
                ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
                k = next(i for i, lab in enumerate(labels) if lab != IGNORE)  # the prompt is everything before
                assert tuple(ids[:k]) in expected, tok.decode(ids[:k])
                seen.add(tuple(ids[:k]))
        assert seen == expected


# ---------------------------------------------------------------- the page


def test_the_page_shows_messages_as_role_blocks_escaped(tmp_path):
    pytest.importorskip("playwright")
    from test_ranking_browser import ARGS, CHROMIUM, _free_port

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    import uvicorn
    from playwright.sync_api import sync_playwright

    from gemcut.label.app import create_app

    store = LabelStore(f"sqlite:///{tmp_path / 'q.db'}")
    msgs = [SYSTEM, {"role": "user", "content": "is <b>this</b> bold?"}, {"role": "assistant", "content": "no."},
            {"role": "user", "content": "and now?"}]
    store.add_prompt("shown", ["a", "b"], messages=msgs)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/label/")
            page.fill("#name", "alice")
            page.click("#start")
            page.wait_for_selector("#work:not([hidden])")
            assert page.locator("#prompt .message .role").all_inner_texts() == ["system", "user", "assistant", "user"]
            assert page.locator("#prompt .message .content").all_inner_texts()[1] == "is <b>this</b> bold?"
            assert page.locator("#prompt b").count() == 0  # text, never markup
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_completion_cut_inside_a_character_is_queued_without_the_half_character(tmp_path, monkeypatch):
    # max_new_tokens can stop between the bytes of one character (byte-level BPE: an emoji is several
    # tokens); the decoded text then ends in U+FFFD, which must not reach the labeler or DPO.
    import gemcut.label.generate as label_generate
    from gemcut.generation import GenerationResult

    def fake_generate(model, tokenizer, rows, **kw):
        return [GenerationResult("computers \U0001f537\ufffd", [1], "length"), GenerationResult("fine.\ufffd", [2], "stop"),
                GenerationResult("\ufffd", [3], "length")]

    monkeypatch.setattr(label_generate, "generate", fake_generate)
    store = LabelStore(f"sqlite:///{tmp_path / 'q.db'}")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "tell me about computers."}) + "\n", encoding="utf-8")
    items = read_prompts(path)
    counts = queue_completions(store, None, tiny_tokenizer(), None, items, n=3, temperature=1.0, top_p=1.0, seed=0,
                               max_new_tokens=4, model_name="fake")
    assert counts["queued"] == 1 and counts["duplicates_dropped"] == 1  # the lone half character is empty
    task = store.next_task("alice")
    # Cut by the length limit: the half character goes; ended by the model: its text is kept as it is.
    assert sorted(text for _, text in task.completions) == ["computers \U0001f537", "fine.\ufffd"]
