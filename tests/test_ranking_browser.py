"""The ranking page end to end in headless Chromium: real clicks and keys, then export, then the pairs.

Needs Debian's chromium (/usr/bin/chromium; scripts/setup.sh installs it when run as root).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served(tmp_path):
    import uvicorn

    from gemcut.label.app import create_app
    from gemcut.label.store import LabelStore

    store = LabelStore(f"sqlite:///{tmp_path / 'label.db'}")
    store.add_prompt("Write a greeting.", ["hello there", "hi", "good day to you"])
    store.add_prompt("Name a colour.", ["red", "blue", "green", "mauve"])
    store.add_prompt("Say something about cats.", ["cats purr", "cats nap"])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield store, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _login(page, url: str, name: str) -> None:
    page.goto(url + "/label/")
    page.fill("#name", name)
    page.click("#start")
    page.wait_for_selector("#work:not([hidden])")


def _pool_texts(page) -> list[str]:
    return page.locator("#pool .card .text").all_inner_texts()


def test_rank_in_the_browser_then_export(served, browser, tmp_path):
    store, url = served
    alice = browser.new_context().new_page()
    bob = browser.new_context().new_page()
    _login(alice, url, "alice")
    _login(bob, url, "bob")

    # Two labelers at once never see the same prompt (alice asked first, so she has the first one).
    a_prompt, b_prompt = alice.inner_text("#prompt"), bob.inner_text("#prompt")
    assert (a_prompt, b_prompt) == ("Write a greeting.", "Name a colour.")
    assert sorted(n for _, n in store.open_leases()) == ["alice", "bob"]
    bob.reload()  # a reload gives bob his own prompt back, not the next one
    bob.wait_for_selector("#work:not([hidden])")
    assert bob.inner_text("#prompt") == b_prompt

    # Alice ranks by clicking cards: the order of her clicks is her ranking; the last one is implied.
    texts = _pool_texts(alice)
    assert sorted(texts) == sorted(["hello there", "hi", "good day to you"])
    want = [texts[2], texts[0], texts[1]]
    assert alice.locator("#submit").is_disabled()
    for t in want[:2]:
        alice.locator("#pool .card", has_text=t).first.click()
    assert alice.locator("#ranked .card .text").all_inner_texts() == want[:2]
    assert alice.locator("#submit").is_enabled()
    alice.click("#submit")
    alice.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('1 of 3')")

    # Bob uses the keyboard (numbers as displayed): 2, a mistaken 3 undone with Backspace, then 1; then
    # drags: a completion dropped on a ranked card goes in just before it, and ranked cards reorder the same way.
    texts_b = _pool_texts(bob)
    assert len(texts_b) == 4
    for key in ("2", "3", "Backspace", "1"):
        bob.keyboard.press(key)
    t1, t2, t3, t4 = texts_b
    ranked = bob.locator("#ranked .card")
    assert ranked.locator(".text").all_inner_texts() == [t2, t1]
    bob.locator("#pool .card", has_text=t4).first.drag_to(ranked.nth(0))
    assert ranked.locator(".text").all_inner_texts() == [t4, t2, t1]
    bob.locator("#pool .card", has_text=t3).first.drag_to(ranked.nth(2))
    assert ranked.locator(".text").all_inner_texts() == [t4, t2, t3, t1]
    ranked.nth(3).drag_to(ranked.nth(0))
    want_b = [t1, t4, t2, t3]
    assert ranked.locator(".text").all_inner_texts() == want_b
    bob.keyboard.press("Enter")
    bob.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('2 of 3')")

    # Alice now holds the third prompt; she flags it, which takes it out of everyone's queue.
    assert alice.inner_text("#prompt") == "Say something about cats."
    alice.fill("#flag-note", "off-topic")
    alice.click("#flag")
    alice.wait_for_selector("#done:not([hidden])")
    bob.click("#reload") if bob.locator("#reload").is_visible() else bob.reload()
    bob.wait_for_selector("#done:not([hidden])")

    from gemcut.label.export import export_preferences

    out = tmp_path / "prefs.jsonl"
    counts = export_preferences(store, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_labeler = {lab: [r for r in rows if r["_labeler"] == lab] for lab in ("alice", "bob")}
    for lab, prompt, order in (("alice", a_prompt, want), ("bob", b_prompt, want_b)):
        got = [(r["chosen"], r["rejected"]) for r in by_labeler[lab]]
        assert got == [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]
        assert all(r["prompt"] == prompt and r["_ranked_at"].endswith("Z") for r in by_labeler[lab])
    assert counts["pairs"] == len(rows) == len(want) * (len(want) - 1) // 2 + len(want_b) * (len(want_b) - 1) // 2
    assert store.progress()["flagged"] == 1

    # The OpenAI DPO form of the same export reads back (through the data pipeline) to the same pairs.
    from gemcut.config import DataConfig
    from gemcut.data.prepare import prepare

    out_oa = tmp_path / "prefs_openai.jsonl"
    export_preferences(store, out_oa, "openai")
    back = prepare(DataConfig(train=[str(out_oa)], split={"validation": 0.0, "test": 0.0}, clean={"dedup_exact": False}), None).splits["train"]
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in back) == sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows)


def test_page_asks_for_a_name_and_shows_progress(served, browser):
    _, url = served
    page = browser.new_page()
    page.goto(url + "/label/")
    assert page.locator("#login").is_visible()
    _login(page, url, "carol")
    assert "of 3 prompts ranked" in page.inner_text("#progress-text")
    assert page.locator("#pool .card").count() >= 2
    assert page.locator("#submit").is_disabled()
    page.close()


def test_page_files_are_packaged():
    from gemcut.label.app import STATIC

    for name in ("index.html", "label.js", "label.css"):
        assert (STATIC / name).is_file()
    assert Path(STATIC).parent.name == "label"
