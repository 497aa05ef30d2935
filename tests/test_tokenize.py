"""Tokenization, packing and collation: loss masks, overlong policy counts, position_ids, batch shapes."""

from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from gemcut.config import DataConfig
from gemcut.data.collate import IGNORE, collate_causal, collate_classify, collate_preference, pack_examples
from gemcut.data.templates import ChatTemplate
from gemcut.data.token_report import token_report
from gemcut.data.tokenize import tokenize_records
from gemcut.errors import DataError
from gemcut.tasks import TASKS

PC = [
    {"prompt": "what is the capital of france?", "completion": "paris.", "_source": "qa.jsonl:1"},
    {"prompt": "hello world", "completion": "hello! the weather is okay today.", "_source": "qa.jsonl:2"},
    {"prompt": "the quick brown fox " * 20, "completion": "jumps.", "_source": "qa.jsonl:3"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tmpl(tok):
    return ChatTemplate.from_tokenizer(tok)


def trained(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


def test_prompt_completion_masks_the_prompt(tok, tmpl):
    examples, stats = tokenize_records(PC[:2], "prompt_completion", tok, tmpl, DataConfig(max_length=512), TASKS["causal_lm"])
    assert [trained(tok, ex) for ex in examples] == ["paris.<|im_end|>", "hello! the weather is okay today.<|im_end|>"]
    for rec, ex in zip(PC, examples):
        conv = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
        assert ex["input_ids"] == tok.apply_chat_template(conv, return_dict=False)
        assert "loss_weight" not in ex  # all weights are 0/1: labels say it all
    assert stats["examples"] == 2 and stats["truncated"] == 0 and stats["dropped"] == {}


def test_overlong_truncate_and_drop_are_counted(tok, tmpl):
    n = len(tmpl.render([{"role": "user", "content": PC[2]["prompt"]}, {"role": "assistant", "content": "jumps."}])[0])
    cfg = DataConfig(max_length=64, overlong="truncate")
    assert n > 64
    examples, stats = tokenize_records(PC, "prompt_completion", tok, tmpl, cfg, TASKS["causal_lm"])
    # Truncation cut off the whole completion of record 3: no loss left, so it is dropped, and counted.
    assert stats["truncated"] == 1 and stats["truncated_sources"] == ["qa.jsonl:3"]
    assert stats["dropped"] == {"no_loss_tokens_after_truncation": 1}
    assert stats["dropped_sources"]["no_loss_tokens_after_truncation"] == ["qa.jsonl:3"]
    assert len(examples) == 2 and all(len(ex["input_ids"]) <= 64 for ex in examples)

    examples, stats = tokenize_records(PC, "prompt_completion", tok, tmpl, DataConfig(max_length=64, overlong="drop"), TASKS["causal_lm"])
    assert stats["dropped"] == {"overlong": 1} and stats["truncated"] == 0 and len(examples) == 2

    # A completion that is only partly cut keeps its first tokens and is counted as truncated.
    long = [{"prompt": "hi", "completion": "the weather is okay today. " * 10, "_source": "x:1"}]
    examples, stats = tokenize_records(long, "prompt_completion", tok, tmpl, DataConfig(max_length=32), TASKS["causal_lm"])
    assert stats["truncated"] == 1 and len(examples[0]["input_ids"]) == 32 and examples[0]["labels"][-1] != IGNORE


def test_messages_weights_give_loss_weight(tok, tmpl):
    rec = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world", "weight": 0.5}],
           "_source": "c.jsonl:1"}
    plain = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "okay"}], "_source": "c.jsonl:2"}
    examples, _ = tokenize_records([rec, plain], "messages", tok, tmpl, DataConfig(), TASKS["causal_lm"])
    w0 = examples[0]["loss_weight"]
    assert set(w0) == {0.0, 0.5}
    assert [w > 0 for w in w0] == [lab != IGNORE for lab in examples[0]["labels"]]
    assert set(examples[1]["loss_weight"]) == {0.0, 1.0}
    with pytest.raises(DataError, match="c.jsonl:9"):
        tokenize_records([{"messages": [{"role": "bot", "content": "x"}], "_source": "c.jsonl:9"}], "messages", tok, tmpl,
                         DataConfig(), TASKS["causal_lm"])


def test_text_blocks_restart_positions_per_document(tok):
    docs = [{"text": "hello world, this is a tiny corpus.", "_source": "t:1"}, {"text": "", "_source": "t:2"},
            {"text": "the quick brown fox jumps over the lazy dog. " * 3, "_source": "t:3"}]
    examples, stats = tokenize_records(docs, "text", tok, None, DataConfig(max_length=16), TASKS["causal_lm"])
    lengths = [len(tok(d["text"], add_special_tokens=False)["input_ids"]) + 1 for d in docs if d["text"]]
    assert sum(len(ex["input_ids"]) for ex in examples) == sum(lengths)  # nothing lost, nothing truncated
    assert all(len(ex["input_ids"]) <= 16 for ex in examples) and stats["dropped"] == {"empty": 1}
    flat_pos = [p for ex in examples for p in ex["position_ids"]]
    flat_lab = [t for ex in examples for t in ex["labels"]]
    doc2 = lengths[0]
    assert flat_pos[doc2] == 0 and flat_pos[doc2 - 1] == lengths[0] - 1  # restart at the second document
    assert flat_lab[doc2] == IGNORE  # not predicted from the previous document's EOS
    assert examples[0]["input_ids"][lengths[0] - 1] == tok.eos_token_id
    for ex in examples:  # each block starts at position 0
        assert ex["position_ids"][0] == 0


def test_pack_examples_restart_positions_and_keep_tokens():
    examples = [{"input_ids": list(range(10 * i, 10 * i + n)), "labels": [IGNORE] * 2 + list(range(10 * i + 2, 10 * i + n))}
                for i, n in enumerate([5, 9, 3, 7, 2, 6])]
    rows = pack_examples(examples, 12)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    assert len(rows) == 3  # 32 tokens in rows of 12: best fit needs 3
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(r["input_ids"])]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == IGNORE
    with pytest.raises(ValueError, match="max_length"):
        pack_examples(examples, 8)


def test_packed_rows_do_not_attend_across_examples(tok, tmpl):
    """The collator's packed batch (position_ids, no attention_mask) gives the same logits as separate rows."""
    torch.manual_seed(0)
    model = tiny_llama(tok)
    examples, _ = tokenize_records(PC[:2], "prompt_completion", tok, tmpl, DataConfig(max_length=128), TASKS["causal_lm"])
    packed = collate_causal(pack_examples(examples, 128) + [examples[0]], tok.pad_token_id)
    assert "attention_mask" not in packed and packed["position_ids"].shape == packed["input_ids"].shape
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        n0 = len(examples[0]["input_ids"])
        for k, ex in enumerate(examples):
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            start = 0 if k == 0 else n0
            torch.testing.assert_close(out[0, start:start + len(ex["input_ids"])], alone, atol=1e-5, rtol=1e-4)
        # The padded third row (one example + padding) matches too: padding is its own sequence.
        torch.testing.assert_close(out[1, :n0], model(input_ids=torch.tensor([examples[0]["input_ids"]])).logits[0],
                                   atol=1e-5, rtol=1e-4)


def test_sft_packing_through_tokenize_records(tok, tmpl):
    examples, stats = tokenize_records(PC[:2] * 3, "prompt_completion", tok, tmpl, DataConfig(max_length=128, packing=True),
                                       TASKS["causal_lm"])
    assert stats["packed"] and stats["examples_before_packing"] == 6 and len(examples) < 6
    assert all("position_ids" in ex for ex in examples)


def test_collate_causal_shapes_and_padding():
    exs = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8], "loss_weight": [0.5]}]
    b = collate_causal(exs, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["loss_weight"].tolist() == [[0.0, 1.0, 1.0], [0.5, 0.0, 0.0]]
    assert "position_ids" not in b


def test_classification_and_generative_classifier(tok, tmpl):
    recs = [{"text": "i love this product", "label": "positive", "_source": "s.csv:2"},
            {"text": "i hate waiting", "label": "negative", "_source": "s.csv:3"},
            {"text": "the weather is okay today, nothing special " * 10, "label": "neutral", "_source": "s.csv:4"}]
    examples, stats = tokenize_records(recs, "label", tok, None, DataConfig(max_length=16), TASKS["classify"])
    assert stats["label_names"] == ["negative", "neutral", "positive"]
    assert [ex["label"] for ex in examples] == [2, 0, 1]
    assert stats["truncated"] == 1 and len(examples[2]["input_ids"]) == 16
    b = collate_classify(examples, tok.pad_token_id)
    assert b["labels"].tolist() == [2, 0, 1] and b["input_ids"].shape == b["attention_mask"].shape
    with pytest.raises(DataError, match="s.csv:2"):
        tokenize_records(recs[:1], "label", tok, None, DataConfig(), TASKS["classify"], label_names=["negative"])

    gen, _ = tokenize_records(recs[:2], "label", tok, tmpl, DataConfig(), TASKS["causal_lm"], ["negative", "neutral", "positive"])
    assert trained(tok, gen[0]) == "positive<|im_end|>"
    text = tok.decode(gen[0]["input_ids"])
    assert "one of: negative, neutral, positive" in text and "Text: i love this product" in text


def test_preference_pairs(tok, tmpl):
    recs = [{"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "london.", "_source": "p:1"}]
    examples, stats = tokenize_records(recs, "preference", tok, tmpl, DataConfig(), TASKS["dpo"])
    ex = examples[0]
    assert trained(tok, {"labels": ex["chosen_labels"]}) == "paris.<|im_end|>"
    assert trained(tok, {"labels": ex["rejected_labels"]}) == "london.<|im_end|>"
    prompt = tmpl.prompt_ids([{"role": "user", "content": recs[0]["prompt"]}])
    assert ex["chosen_input_ids"][:len(prompt)] == ex["rejected_input_ids"][:len(prompt)] == prompt
    b = collate_preference(examples, tok.pad_token_id)
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == b["rejected_attention_mask"].shape


def test_token_report_marks_loss_tokens_and_counts(tok, tmpl, tmp_path):
    prepared = SimpleNamespace(kind="prompt_completion", labels=None, splits={"train": PC, "validation": PC[:1]})
    rep = token_report(prepared, DataConfig(max_length=64), "tiny", tokenizer=tok, out_dir=tmp_path)
    tr = rep["splits"]["train"]
    assert tr["count"] == 3 and tr["over_max_length"] == 1 and tr["truncated"] == 1
    assert tr["dropped"] == {"no_loss_tokens_after_truncation": 1} and tr["max"] > 64
    assert rep["examples"][0].endswith("[[paris.<|im_end|>]]\n")
    assert "user\nwhat is the capital of france?" in rep["examples"][0]
    assert any("over max_length=64" in line for line in rep["summary"])
    assert (tmp_path / "token_lengths.png").stat().st_size > 1000
