"""Fused AdamW matches the unfused update; layer-wise learning-rate decay: depths read from parameter names, the rates they get, and one real
optimizer step that moves each depth by its own rate.

    python -m pytest -q tests/test_optimizer.py
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_bert_classifier, tiny_llama, tiny_tokenizer
from train_helpers import class_examples, collate_classify, config, fit_examples

from gemcut.config import AdapterConfig
from gemcut.models.adapters import apply_adapter
from gemcut.objectives import Classify
from gemcut.train.optimizer import adamw, fused_supported, param_groups, parameter_depth


def rate_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_depths_follow_electra_embeddings_blocks_then_top():
    assert parameter_depth("bert.embeddings.word_embeddings.weight", 6) == 0
    assert parameter_depth("bert.embeddings.LayerNorm.weight", 6) == 0
    assert parameter_depth("bert.encoder.layer.0.attention.self.query.weight", 6) == 1
    assert parameter_depth("bert.encoder.layer.5.output.dense.bias", 6) == 6
    assert parameter_depth("base_model.model.model.layers.11.self_attn.q_proj.lora_A.default.weight", 30) == 12
    assert parameter_depth("transformer.h.2.attn.c_attn.weight", 12) == 3
    assert parameter_depth("transformer.wte.weight", 12) == 0
    assert parameter_depth("bert.pooler.dense.weight", 6) == 7
    assert parameter_depth("classifier.weight", 6) == 7
    assert parameter_depth("model.norm.weight", 30) == 31


def test_bert_rates_decay_from_the_head_down_and_cover_every_parameter_once():
    model = tiny_bert_classifier(tiny_tokenizer())  # 2 blocks: depths 0..3
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, layer_decay=0.5)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])  # highest first
    rates = rate_of(groups)
    assert sorted(rates) == sorted(id(p) for p in model.parameters())
    named = dict(model.named_parameters())
    assert rates[id(named["classifier.weight"])] == pytest.approx(1e-3)
    assert rates[id(named["bert.pooler.dense.weight"])] == pytest.approx(1e-3)
    assert rates[id(named["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(5e-4)
    assert rates[id(named["bert.encoder.layer.0.output.dense.weight"])] == pytest.approx(2.5e-4)
    assert rates[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(1.25e-4)
    assert all(g["weight_decay"] == 0.01 for g in groups)


def test_no_decay_is_one_group_and_frozen_parameters_stay_out():
    model = apply_adapter(tiny_llama(tiny_tokenizer()), AdapterConfig(method="lora", r=4, alpha=8), "causal_lm")
    trainable = [p for p in model.parameters() if p.requires_grad]
    one = param_groups(model, lr=1e-3, weight_decay=0.0)
    assert len(one) == 1 and len(one[0]["params"]) == len(trainable)
    groups = param_groups(model, lr=1e-3, weight_decay=0.0, layer_decay=0.5)
    assert sorted(rate_of(groups)) == sorted(id(p) for p in trainable)  # LoRA factors only, by block
    assert [g["lr"] for g in groups] == pytest.approx([5e-4, 2.5e-4])  # blocks 1 and 0; nothing above them trains


def test_one_adam_step_moves_each_depth_by_its_own_rate(tmp_path):
    """Adam's first step moves each weight by about lr * sign(grad), so the largest change per tensor reads
    back the rate its group got; the logged lr is the peak (head) rate."""
    model = tiny_bert_classifier(tiny_tokenizer())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_examples(model, Classify(), class_examples(16), collate_classify, run_dir=tmp_path,
        config=config(max_steps=1, batch_size=16, lr=1e-3, warmup_steps=0, schedule="constant", layer_lr_decay=0.5))
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert moved["classifier.weight"] == pytest.approx(1e-3, rel=0.02)
    assert moved["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(5e-4, rel=0.02)
    assert moved["bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(2.5e-4, rel=0.02)
    assert moved["bert.embeddings.word_embeddings.weight"] == pytest.approx(1.25e-4, rel=0.02)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(1e-3)


def test_config_rejects_a_decay_outside_zero_to_one():
    with pytest.raises(Exception, match="layer_lr_decay"):
        config(layer_lr_decay=1.5)
    with pytest.raises(Exception, match="layer_lr_decay"):
        config(layer_lr_decay=0.0)


def test_fused_adamw_matches_the_unfused_update():
    """Ten steps of the fused kernel on a tiny classifier land on the weights the reference loop gives."""
    models = [tiny_bert_classifier(tiny_tokenizer(), seed=3) for _ in range(2)]
    batch = collate_classify(class_examples(8))
    fused = adamw(param_groups(models[0], lr=1e-2, weight_decay=0.1, layer_decay=0.8), lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(param_groups(models[1], lr=1e-2, weight_decay=0.1, layer_decay=0.8), lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(10):
        for model, opt in zip(models, (fused, plain)):
            model.train()
            torch.manual_seed(0)  # the same dropout masks in both
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if "key.bias" in name:
            # softmax ignores a constant added to every score of a query, so this gradient is rounding noise
            # and Adam scales noise to full steps: it is expected to differ between any two summation orders
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_only_where_the_kernel_runs():
    assert fused_supported([torch.zeros(2, requires_grad=True)])
    assert not fused_supported([torch.zeros(2, dtype=torch.int64)])
    assert not fused_supported([torch.zeros(2, device="meta")])
