"""The derived preference set `chatterbot-pairs` (gemcut/data/derived.py), on the real packaged corpus.

    python -m pytest -q tests/test_derived_data.py
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from gemcut.config import DataConfig
from gemcut.data import derived
from gemcut.data.assets import is_alias, packaged_data, resolve_source
from gemcut.data.prepare import prepare

ALIAS = "chatterbot-pairs"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMCUT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def key(text: str) -> str:
    return " ".join(text.split()).casefold()


def opening_questions(folder) -> dict[str, set[str]]:
    """Each topic file's distinct opening questions, read with plain yaml (not gemcut's reader)."""
    out = {}
    for f in sorted(folder.glob("*.yml")):
        convs = yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []
        out[f.stem] = {key(str(c[0])) for c in convs if isinstance(c, list) and len(c) >= 2}
    return out


def test_one_pair_per_question_rejected_from_another_topic(home):
    path = resolve_source(ALIAS)
    assert is_alias(ALIAS) and path == home / "data" / ALIAS / f"{ALIAS}.jsonl"
    pairs = read(path)
    questions = [key(p["prompt"]) for p in pairs]
    assert len(questions) == len(set(questions)), "a question is used twice"
    by_topic = opening_questions(packaged_data("chatterbot"))
    everywhere = set().union(*by_topic.values())
    assert set(questions) == everywhere, "every opening question of the corpus is used"
    assert len(pairs) > 700
    chosen_texts = {p["chosen"] for p in pairs}
    for p in pairs:
        assert p["_rejected_topic"] != p["_topic"]
        assert p["_chosen_from"].startswith(f"chatterbot/{p['_topic']}.yml:")
        assert p["_rejected_from"].startswith(f"chatterbot/{p['_rejected_topic']}.yml:")
        assert p["rejected"].strip() != p["chosen"].strip()
        assert p["rejected"] in chosen_texts  # another question's own reply
        assert key(p["prompt"]) in by_topic[p["_topic"]]
    assert len({p["_rejected_topic"] for p in pairs}) >= 15  # rejected replies come from many topics
    counts = json.loads((path.parent / derived.STAMP).read_text())["counts"]
    assert counts["pairs"] == len(pairs) and counts["skipped_wrong_type"] == 1  # trivia.yml:35 is malformed


def test_deterministic(tmp_path, monkeypatch):
    first, _ = derived.chatterbot_pairs(packaged_data("chatterbot"))
    again, _ = derived.chatterbot_pairs(packaged_data("chatterbot"))
    other_seed, _ = derived.chatterbot_pairs(packaged_data("chatterbot"), seed=1)
    assert first == again
    assert [p["rejected"] for p in first] != [p["rejected"] for p in other_seed]
    files = []
    for name in ("a", "b"):
        monkeypatch.setenv("GEMCUT_HOME", str(tmp_path / name))
        files.append(packaged_data(ALIAS).read_bytes())
    assert files[0] == files[1]


def test_built_once_and_rebuilt_when_the_stamp_differs(home):
    path = packaged_data(ALIAS)
    stamp_file = path.parent / derived.STAMP
    built = path.stat().st_mtime_ns
    assert packaged_data(ALIAS).stat().st_mtime_ns == built  # the stamp matches: not rebuilt
    stamp = json.loads(stamp_file.read_text())
    stamp["source_sha256"]["food.yml"] = "0" * 64  # as if the corpus had changed since
    stamp_file.write_text(json.dumps(stamp))
    assert packaged_data(ALIAS).stat().st_mtime_ns != built
    assert json.loads(stamp_file.read_text())["source_sha256"]["food.yml"] != "0" * 64
    stamp_file.unlink()  # a build killed before its stamp: not finished, so built again
    packaged_data(ALIAS)
    assert stamp_file.is_file()
    assert not [p for p in home.joinpath("data").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_changed_source_is_rebuilt_with_its_new_question(home, tmp_path):
    corpus = tmp_path / "english"
    shutil.copytree(packaged_data("chatterbot"), corpus)
    before = read(derived.derived_data(ALIAS, corpus))
    with (corpus / "food.yml").open("a", encoding="utf-8") as f:
        f.write("- - What is a crumpet?\n  - A griddle cake, eaten toasted.\n")
    after = read(derived.derived_data(ALIAS, corpus))
    assert len(after) == len(before) + 1
    new = next(p for p in after if p["prompt"] == "What is a crumpet?")
    assert new["chosen"] == "A griddle cake, eaten toasted." and new["_rejected_topic"] != "food"


def test_reads_as_preference_records_through_prepare(home):
    prepared = prepare(DataConfig(train=[ALIAS], split={"validation": 0.1, "test": 0.1}))
    assert prepared.kind == "preference"
    assert prepared.report["sources"][0]["path"] == ALIAS
    record = prepared.splits["train"][0]
    assert set(record) == {"prompt", "chosen", "rejected", "_source"}  # provenance fields stay out of training
    assert record["_source"].startswith(f"{ALIAS}:")
    assert sum(len(s) for s in prepared.splits.values()) >= 740
