"""Ways to update a model: LoRA leaves base weights untouched, freeze trains only the last N blocks + head."""

import re

import pytest
import torch
from tiny import tiny_bert_classifier, tiny_llama, tiny_tokenizer

from gemcut.config import AdapterConfig
from gemcut.errors import ConfigError
from gemcut.models.adapters import apply_adapter, count_parameters, find_blocks, trainable_summary


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def step(model, tok, classify=False):
    """One AdamW step on a small batch; returns the parameters before it, by name."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([tok("hello world, this is a tiny corpus")["input_ids"]] * 2)
    model.train()
    out = model(input_ids=ids, labels=torch.tensor([0, 1]) if classify else ids)
    out.loss.backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    return before


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_lora_leaves_base_weights_untouched(tok):
    model = apply_adapter(tiny_llama(tok), AdapterConfig(method="lora", r=4, alpha=8), "causal_lm")
    before = step(model, tok)
    moved = changed(model, before)
    assert moved and all("lora_" in n for n in moved)
    # Every linear layer of every block got an adapter ("all-linear"), the tied lm_head did not.
    names = {n for n, _ in model.named_parameters() if "lora_A" in n}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"layers.1.{'self_attn' if proj[0] in 'qkvo' else 'mlp'}.{proj}.lora_A" in n for n in names)
    assert not any("lm_head" in n for n in names)
    assert re.fullmatch(r"LoRA r=4: [\d.]+K of [\d.]+K trainable \(\d+\.\d%\)", trainable_summary(model, AdapterConfig(r=4)))


def test_lora_classifier_trains_its_new_head_and_dora(tok):
    model = apply_adapter(tiny_bert_classifier(tok, num_labels=2), AdapterConfig(method="lora", r=4, dora=True), "classify")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA
    assert not any("lora_" in n for n in trainable if "classifier" in n)  # the head trains in full, no adapter on it
    moved = changed(model, step(model, tok, classify=True))
    assert all("lora_" in n or "modules_to_save" in n for n in moved)
    assert trainable_summary(model, AdapterConfig(r=4, dora=True)).startswith("DoRA r=4: ")


def test_freeze_trains_only_last_n_blocks_and_head_llama(tok):
    model = apply_adapter(tiny_llama(tok, layers=4), AdapterConfig(method="freeze", train_last_n_layers=2), "causal_lm")
    assert find_blocks(model)[0] == "model.layers"
    moved = changed(model, step(model, tok))
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.")) for n in moved)
    assert any(n.startswith("model.layers.2.") for n in moved) and "model.norm.weight" in moved
    assert "model.embed_tokens.weight" not in moved  # the tied lm_head stays frozen with the embeddings
    assert trainable_summary(model, AdapterConfig(method="freeze", train_last_n_layers=2)).startswith(
        "freeze (last 2 of 4 blocks + head): ")


def test_freeze_bert_classifier(tok):
    model = apply_adapter(tiny_bert_classifier(tok, num_labels=2), AdapterConfig(method="freeze", train_last_n_layers=1), "classify")
    assert find_blocks(model)[0] == "bert.encoder.layer"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in trainable)
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= trainable
    assert changed(model, step(model, tok, classify=True)) == trainable
    with pytest.raises(ConfigError, match="at most 2"):
        apply_adapter(tiny_bert_classifier(tok), AdapterConfig(method="freeze", train_last_n_layers=3), "classify")


def test_full_trains_everything(tok):
    model = apply_adapter(tiny_llama(tok), AdapterConfig(method="full"), "causal_lm")
    trainable, total = count_parameters(model)
    assert trainable == total
    assert trainable_summary(model, AdapterConfig(method="full")).endswith("trainable (100.0%)")
