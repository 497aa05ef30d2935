"""Selective recomputation changes what a decoder keeps, not what it computes; auto picks the plan the memory
budget allows and the run's manifest records it.

    python -m pytest -q tests/test_recompute.py
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import CORPUS, save_tiny_llama, tiny_bert_classifier, tiny_llama

from gemcut.config import AdapterConfig, load_config
from gemcut.models.adapters import apply_adapter
from gemcut.models.fast import FastPathError
from gemcut.models.fast.recompute import RELIES_ON, apply_plan, plan_of, selective_missing, use_selective_recomputation
from gemcut.train.estimate import choose_activation_plan, measure_saved_bytes
from gemcut.train.run import train


def _lora_llama():
    model = tiny_llama(layers=3)
    cfg = AdapterConfig(method="lora", r=4, alpha=8, target_modules="all-linear")
    return apply_adapter(model, cfg, "causal_lm").train()


def _batch(vocab: int):
    """Two rows, the second padded, and a packed-style row of two documents (position ids restart)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_and_grads(model, batch, precision: str):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        (loss, saved) = measure_saved_bytes(lambda: model(**batch).loss, list(model.parameters()))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, saved


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_selective_gives_the_same_loss_and_gradients_and_keeps_less(precision):
    plain = _lora_llama()
    selective = copy.deepcopy(plain)
    assert use_selective_recomputation(selective) == 3 and plan_of(selective) == "selective" and plan_of(plain) == "none"
    batch = _batch(plain.get_base_model().config.vocab_size)
    loss, grads, saved = _loss_and_grads(plain, batch, precision)
    loss_s, grads_s, saved_s = _loss_and_grads(selective, batch, precision)
    assert torch.equal(loss, loss_s)
    assert grads.keys() == grads_s.keys() and len(grads) == 3 * 7 * 2  # LoRA A and B of 7 linears in 3 layers
    for name in grads:
        assert torch.equal(grads[name], grads_s[name]), name
    # What is gone is at least the recomputed tensors, per token and layer: in fp32 the two norm outputs, SiLU(gate)
    # and SiLU(gate) * up (2h + 2I values); under bf16 the five bf16 copies of the norm outputs the LoRA A
    # matrices kept, SiLU(gate) and the copy of SiLU(gate) * up down_proj's LoRA A kept (5h + 2I values). Layer
    # 0's recipes keep the embedding output (h fp32 values a token), which autograd did not need before.
    config = plain.get_base_model().config
    h, inter, layers, tokens = config.hidden_size, config.intermediate_size, config.num_hidden_layers, batch["input_ids"].numel()
    values, size = (2 * h + 2 * inter, 4) if precision == "fp32" else (5 * h + 2 * inter, 2)
    assert saved - saved_s >= tokens * (layers * values * size - 4 * h), (saved, saved_s)
    assert saved_s < 0.8 * saved  # the logits, the same in both, are most of the rest on a model this small


def test_selective_full_fine_tuning_is_exact_too():
    plain = tiny_llama(layers=2).train()
    selective = copy.deepcopy(plain)
    apply_plan(selective, "selective")
    batch = _batch(plain.config.vocab_size)
    loss, grads, _ = _loss_and_grads(plain, batch, "bf16")
    loss_s, grads_s, _ = _loss_and_grads(selective, batch, "bf16")
    assert torch.equal(loss, loss_s)
    for name in grads:
        assert torch.equal(grads[name], grads_s[name]), name


def test_eval_and_no_grad_forwards_are_unchanged():
    plain = _lora_llama().eval()
    selective = copy.deepcopy(plain)
    use_selective_recomputation(selective)
    batch = _batch(plain.get_base_model().config.vocab_size)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, selective(**batch).logits)


class _NormIntoOneBuffer(torch.nn.Module):
    """An RMSNorm that writes its output into one buffer shared by every norm of the model: the second norm of a
    layer then returns a tensor at the first one's address, as an allocator that hands a freed block straight
    back (glibc's mmap for large blocks) does."""

    def __init__(self, norm, buffer):
        super().__init__()
        self.norm, self.buffer = norm, buffer

    def forward(self, x):
        out = self.norm(x)
        if self.buffer[0] is None or self.buffer[0].shape != out.shape:
            self.buffer[0] = torch.empty_like(out)
        return self.buffer[0].copy_(out)


def test_a_norm_output_at_a_reused_address_gets_its_own_cast():
    """The bf16 cast of a norm output is the one made from that output, not one of an earlier output that lived
    at the same address (a stale cast gave a loss of 15 where 3.2 was right on smollm2 with large blocks mmapped)."""
    plain = _lora_llama()
    buffer = [None]
    for layer in plain.get_base_model().model.layers:
        layer.input_layernorm = _NormIntoOneBuffer(layer.input_layernorm, buffer)
        layer.post_attention_layernorm = _NormIntoOneBuffer(layer.post_attention_layernorm, buffer)
    selective = copy.deepcopy(plain)
    use_selective_recomputation(selective)
    batch = _batch(plain.get_base_model().config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # grad mode on: the selective hooks run
        assert torch.equal(plain(**batch).logits, selective(**batch).logits)


def test_what_it_relies_on_is_in_the_installed_transformers_and_a_moved_part_is_named():
    model = tiny_llama()
    assert selective_missing(model) == [] and "mlp.act_fn" in RELIES_ON
    for layer in model.model.layers:
        del layer.mlp.act_fn
    with pytest.raises(FastPathError, match="LlamaMLP.act_fn"):
        use_selective_recomputation(model)
    with pytest.raises(FastPathError, match="'bert'"):
        use_selective_recomputation(tiny_bert_classifier())


def _run_config(tmp_path, model_dir, data, name, *extra):
    return load_config(None, [
        f"model.name={model_dir}", f"data.train=[{data}]", "data.max_length=64", "data.split.validation=0",
        "data.split.test=0", "adapter.r=4", "adapter.alpha=8", "train.batch_size=4", "train.max_steps=2",
        "train.precision=fp32", "train.sample_prompts=0", "eval.forgetting_data=null", f"output.dir={tmp_path}",
        f"output.name={name}", *extra,
    ])


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a} ({i})"}, {"role": "assistant", "content": b}]}
            for i in range(3) for a, b in zip(CORPUS, CORPUS[1:] + CORPUS[:1])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("setting", "plan"), [("false", "none"), ("true", "full"), ("selective", "selective")])
def test_the_fixed_settings_keep_their_meaning(tmp_path, setting, plan):
    cfg = _run_config(tmp_path, "unused", "unused.jsonl", "x", f"train.activation_checkpointing={setting}")
    assert choose_activation_plan(cfg, _lora_llama(), "causal_lm")[0] == plan


def test_auto_picks_the_fastest_plan_the_budget_allows(tmp_path):
    model = _lora_llama()

    def pick(budget_gb):
        cfg = _run_config(tmp_path, "unused", "unused.jsonl", "x", "train.activation_checkpointing=auto",
                          f"train.memory_budget_gb={budget_gb}")
        return choose_activation_plan(cfg, model, "causal_lm")

    assert pick(1e-9)[0] == "full" and "no plan fits" in pick(1e-9)[1]
    assert pick(1e6)[0] == "none"
    # Between what the selective plan and what the none plan need: selective.
    from gemcut.train.estimate import GB, approximate_activations, estimate_model

    cfg = _run_config(tmp_path, "unused", "unused.jsonl", "x")
    est = estimate_model(cfg, model, "causal_lm")
    others = est.required_bytes - est.activations_bytes
    base = model.get_base_model()
    none, selective = (others + approximate_activations(base, 4, 64, 4, None, plan=p) for p in ("none", "selective"))
    assert selective < none
    assert pick((selective + none) / 2 / GB)[0] == "selective"
    assert plan_of(model) == "none"  # choosing applies nothing


def test_the_manifest_and_printout_record_the_plan_auto_chose(tmp_path, chats, capsys):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    runs = {budget: train(_run_config(tmp_path, model_dir, chats, f"auto-{budget}", "train.activation_checkpointing=auto",
                                      f"train.memory_budget_gb={budget}"))
            for budget in ("1e-9", "1e6")}
    plans = {budget: json.loads((run / "manifest.json").read_text())["activation_checkpointing"] for budget, run in runs.items()}
    assert plans == {"1e-9": "full", "1e6": "none"}
    assert "activation checkpointing: full (auto: no plan fits" in capsys.readouterr().err
    plain = train(_run_config(tmp_path, model_dir, chats, "plain"))
    assert json.loads((plain / "manifest.json").read_text())["activation_checkpointing"] == "none"


def test_a_selective_run_trains_like_a_plain_one(tmp_path, chats):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    runs = [train(_run_config(tmp_path, model_dir, chats, f"run-{s}", f"train.activation_checkpointing={s}", "train.max_steps=3"))
            for s in ("false", "selective")]
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in x] for r in runs]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert json.loads((runs[1] / "manifest.json").read_text())["activation_checkpointing"] == "selective"
