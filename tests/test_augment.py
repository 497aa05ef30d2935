"""Data augmentation: copies of training records only, never in validation or test, checked for leakage against
them; the cheap operations seeded; paraphrases written by a tiny model through the real sampler.

    python -m pytest -q tests/test_augment.py
"""

from __future__ import annotations

import json
import random

import pytest
from tiny import save_tiny_llama

from gemcut.config import AugmentConfig, DataConfig, ParaphraseConfig
from gemcut.data.augment import augment_records, word_dropout, word_swap
from gemcut.data.prepare import prepare
from gemcut.errors import DataError

TOPICS = ["flight", "bag", "seat", "crew", "meal", "gate", "ticket", "refund", "delay", "lounge"]


def _labels(tmp_path, n: int = 90):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        words = rng.sample(TOPICS, 4)
        rows.append({"text": f"Record {i} says the {words[0]} and the {words[1]} were {['great', 'bad', 'fine'][i % 3]} "
                             f"while the {words[2]} near the {words[3]} number {i * 7919 % 1000}", "label": ["pos", "neg", "neu"][i % 3]})
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(path, **augment) -> DataConfig:
    return DataConfig.model_validate({"train": [str(path)], "split": {"validation": 0.2, "test": 0.2}, "augment": augment})


def test_operations_copy_training_records_only(tmp_path):
    path = _labels(tmp_path)
    plain = prepare(_cfg(path))
    prepared = prepare(_cfg(path, operations={"word_dropout": 0.5, "word_swap": 0.5, "lowercase": 1.0}, seed=3))
    for split in ("validation", "test"):  # augmentation comes after the split: the evaluation splits are untouched
        assert prepared.splits[split] == plain.splits[split]
        assert not any("augmented" in r for r in prepared.splits[split])
    made = [r for r in prepared.splits["train"] if "augmented" in r]
    assert {r["augmented"] for r in made} == {"word_dropout", "word_swap", "lowercase"}
    assert [r for r in prepared.splits["train"] if "augmented" not in r] == plain.splits["train"]
    aug = prepared.report["augment"]
    assert aug["added"] == len(made) == sum(op["made"] for op in aug["operations"].values()) - aug["removed_by_leakage_check"]
    assert aug["operations"]["lowercase"]["chosen"] == len(plain.splits["train"])
    assert 0.25 < aug["operations"]["word_dropout"]["chosen"] / len(plain.splits["train"]) < 0.75
    assert {e["operation"] for e in aug["examples"]} == {"word_dropout", "word_swap", "lowercase"}
    assert all(r["_source"].endswith("#" + r["augmented"]) and r["label"] in ("pos", "neg", "neu") for r in made)
    again = prepare(_cfg(path, operations={"word_dropout": 0.5, "word_swap": 0.5, "lowercase": 1.0}, seed=3))
    assert again.content_hash == prepared.content_hash  # seeded: the same copies every time


def test_a_copy_that_duplicates_an_evaluation_record_is_caught(tmp_path):
    path = _labels(tmp_path)
    plain = prepare(_cfg(path))
    tests = [r["text"] for r in plain.splits["test"]]
    trains = [r["text"] for r in plain.splits["train"]]
    # A "model" that writes, for each training text, a test record: exactly for some, nearly (with a "!") for others.
    answers = {t: (tests[i % len(tests)] if i % 2 else tests[i % len(tests)] + "!") for i, t in enumerate(trains)}
    prepared = prepare(_cfg(path, paraphrase={"model": "unused", "share": 1.0}), paraphrase=lambda texts: [answers[t] for t in texts])
    aug = prepared.report["augment"]
    assert aug["operations"]["paraphrase"]["made"] == len(trains)
    assert aug["removed_by_leakage_check"] == len(trains) and aug["added"] == 0
    assert not any("augmented" in r for r in prepared.splits["train"])
    leaks = prepared.report["leakage"]
    assert leaks["exact"].get("test", 0) >= len(trains) // 2 and leaks["near"].get("test", 0) >= 1


def test_paraphrases_without_a_model_are_left_out_with_a_warning(tmp_path):
    prepared = prepare(_cfg(_labels(tmp_path), paraphrase={"model": "x", "share": 0.5}))
    assert prepared.report["augment"]["operations"]["paraphrase"]["written"] is False
    assert any("no paraphrases were written" in w for w in prepared.report["warnings"])


def test_text_corpora_are_not_augmented(tmp_path):
    (tmp_path / "notes.txt").write_text("a document of plain text\n")
    with pytest.raises(DataError, match="text records"):
        prepare(DataConfig.model_validate({"train": [str(tmp_path / "notes.txt")], "augment": {"operations": {"lowercase": 1.0}}}))


def test_cheap_operations_are_seeded_and_keep_a_word():
    text = "the quick brown fox jumps over the lazy dog"
    assert word_dropout(text, 0.5, random.Random(1)) == word_dropout(text, 0.5, random.Random(1))
    assert word_dropout("word", 0.99, random.Random(0)) == "word"
    swapped = word_swap(text, random.Random(2))
    assert sorted(swapped.split()) == sorted(text.split()) and swapped != text
    # conversations: the last user turn is rewritten, the answer never
    chat = {"messages": [{"role": "user", "content": "Hello There Friend"}, {"role": "assistant", "content": "Hi You"}], "_id": "c:1"}
    made, report = augment_records([chat], "messages", AugmentConfig(operations={"lowercase": 1.0}), None)
    assert made[0]["messages"] == [{"role": "user", "content": "hello there friend"}, {"role": "assistant", "content": "Hi You"}]
    assert report["operations"]["lowercase"] == {"share": 1.0, "chosen": 1, "made": 1, "unchanged": 0}


def test_paraphrases_by_a_tiny_model_through_the_sampler(tmp_path):
    from gemcut.train.paraphrase import ModelParaphraser

    model = save_tiny_llama(tmp_path / "tiny-llama")
    cfg = ParaphraseConfig(model=str(model), max_new_tokens=6, temperature=0.8, batch_size=2)
    texts = ["the quick brown fox", "hello world", "what is the capital of france?"]
    first = ModelParaphraser(cfg, seed=1)(texts)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert ModelParaphraser(cfg, seed=1)(texts[::-1]) == first[::-1]  # each text's seed is its own: no batch effects
    path = _labels(tmp_path, n=30)
    paraphraser = ModelParaphraser(cfg.model_copy(update={"share": 0.5}), seed=0)
    prepared = prepare(_cfg(path, paraphrase=cfg.model_copy(update={"share": 0.5}).model_dump()), paraphrase=paraphraser)
    op = prepared.report["augment"]["operations"]["paraphrase"]
    assert op["written"] and op["chosen"] > 0 and op["made"] + op["unchanged"] == op["chosen"]
    made = [r for r in prepared.splits["train"] if r.get("augmented") == "paraphrase"]
    assert len(made) == prepared.report["augment"]["added"]
    originals = {r["_source"]: r["text"] for r in prepared.splits["train"] if "augmented" not in r}
    for r in made:  # the copy's text is what the model wrote for its original's text
        assert r["text"] == paraphraser.written[originals[r["_source"].removesuffix("#paraphrase")]]
