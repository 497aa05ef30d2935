"""Chat templates: ids equal apply_chat_template's, loss weights sit exactly on assistant content + end of turn."""

import pytest
from tiny import tiny_tokenizer

from gemcut.data.templates import NAMED_TEMPLATES, ChatTemplate
from gemcut.errors import ConfigError

CONV = [
    {"role": "system", "content": "answer the question briefly."},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "paris is the capital of france."},
    {"role": "user", "content": "and the weather?"},
    {"role": "assistant", "content": "the weather is okay today.", "weight": 0.5},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def trained_text(tok, ids, weights, value=None):
    return tok.decode([t for t, w in zip(ids, weights) if (w > 0 if value is None else w == value)])


def test_ids_equal_apply_chat_template(tok):
    t = ChatTemplate.from_tokenizer(tok)
    for conv in (CONV, CONV[1:3], CONV[:2]):
        ids, weights = t.render(conv)
        assert ids == tok.apply_chat_template(conv, return_dict=False)
        assert len(weights) == len(ids)
    assert t.prompt_ids(CONV[:2]) == tok.apply_chat_template(CONV[:2], add_generation_prompt=True, return_dict=False)


def test_prompt_tokens_carry_no_loss_and_weights_are_honoured(tok):
    t = ChatTemplate.from_tokenizer(tok)
    ids, weights = t.render(CONV)
    # Exactly the assistant contents and their <|im_end|> carry loss, with each message's weight.
    assert trained_text(tok, ids, weights, 1.0) == "paris is the capital of france.<|im_end|>"
    assert trained_text(tok, ids, weights, 0.5) == "the weather is okay today.<|im_end|>"
    first_trained = next(i for i, w in enumerate(weights) if w > 0)
    prompt = t.prompt_ids(CONV[:2])
    assert first_trained == len(prompt) and all(w == 0 for w in weights[:first_trained])


def test_weight_zero_assistant_and_train_on_all(tok):
    t = ChatTemplate.from_tokenizer(tok)
    conv = [CONV[1], {**CONV[2], "weight": 0}, CONV[3], {"role": "assistant", "content": "okay."}]
    ids, weights = t.render(conv)
    assert trained_text(tok, ids, weights) == "okay.<|im_end|>"
    ids_all, w_all = t.render(conv, train_on="all")
    assert ids_all == ids
    assert "paris" not in trained_text(tok, ids_all, w_all)  # weight 0 stays 0 even with train_on=all
    assert "capital of france?" in trained_text(tok, ids_all, w_all)  # the prompt trains


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_templates_train_content_and_eos(tok, name):
    t = ChatTemplate.from_tokenizer(tok, name)
    ids, weights = t.render(CONV[1:3])
    assert ids == tok.apply_chat_template(CONV[1:3], chat_template=NAMED_TEMPLATES[name], return_dict=False)
    assert trained_text(tok, ids, weights) == "paris is the capital of france." + tok.eos_token


def test_system_prompt_prepended_only_when_missing(tok):
    t = ChatTemplate.from_tokenizer(tok, system_prompt="be brief.")
    text = t.render_text(CONV[1:2], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nbe brief.<|im_end|>")
    assert "be brief." not in t.render_text(CONV)


def test_missing_template_and_unknown_name_are_config_errors(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ConfigError, match="data.template"):
        ChatTemplate.from_tokenizer(bare)
    with pytest.raises(ConfigError, match="chatml"):
        ChatTemplate.from_tokenizer(tok, "vicuna")


def test_save_load_roundtrip(tok, tmp_path):
    t = ChatTemplate.from_tokenizer(tok, "alpaca", system_prompt="be brief.")
    t.save(tmp_path)
    back = ChatTemplate.load(tmp_path, tok)
    assert (back.name, back.system_prompt, back.source) == ("alpaca", "be brief.", NAMED_TEMPLATES["alpaca"])
    assert back.render(CONV) == t.render(CONV)
    assert tok.convert_tokens_to_ids("<|im_end|>") in t.stop_token_ids
