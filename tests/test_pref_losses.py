"""Pairwise (Bradley–Terry) and DPO losses against hand-computed values; DPO's implicit reference equals a
separate frozen copy of the base model; reward functions."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_bert_classifier, tiny_llama, tiny_tokenizer

from gemcut.config import AdapterConfig
from gemcut.models.adapters import apply_adapter
from gemcut.models.numerics import sequence_logps
from gemcut.objectives.dpo import DPO, dpo_loss, reference
from gemcut.objectives.reward import PairwiseReward, pairwise_accuracy, pairwise_loss
from gemcut.objectives.reward_functions import ClassifierReward, RewardModelReward, pair_encoder


def nll_sigmoid(x: float) -> float:
    return -math.log(1 / (1 + math.exp(-x)))


def test_pairwise_loss_by_hand():
    r_c = torch.tensor([2.0, 0.0, -1.0])
    r_r = torch.tensor([1.0, 0.0, 1.0])
    loss = pairwise_loss(r_c, r_r)
    # -log sigmoid(1) = 0.31326169, -log sigmoid(0) = log 2, -log sigmoid(-2) = 2.12692801
    torch.testing.assert_close(loss, torch.tensor([0.31326169, 0.69314718, 2.12692801]))
    assert pairwise_accuracy(r_c, r_r) == pytest.approx(1 / 3)  # a tie is not a correct ranking
    # Stable where the naive form overflows.
    assert float(pairwise_loss(torch.tensor([-200.0]), torch.tensor([200.0]))) == pytest.approx(400.0)


class FirstTokenReward(torch.nn.Module):
    """A fake one-output classifier: the reward is the first token id (so the loss is computable by hand)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=(input_ids[:, :1].float() * self.w))


def test_pairwise_objective_by_hand():
    batch = {"chosen_input_ids": torch.tensor([[3, 0], [1, 0]]), "rejected_input_ids": torch.tensor([[1, 0], [2, 0]])}
    out = PairwiseReward()(FirstTokenReward(), batch)
    # pairs: 3 vs 1 -> -log sigmoid(2); 1 vs 2 -> -log sigmoid(-1)
    assert float(out.loss_sum.detach()) == pytest.approx(nll_sigmoid(2) + nll_sigmoid(-1), rel=1e-6)
    assert out.n_targets == 2 and int(out.metrics["correct"]) == 1
    assert float(out.metrics["margin"]) == pytest.approx(2 - 1)


def test_dpo_loss_by_hand():
    loss, r_c, r_r = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    # rewards: 0.1 * (-1 - -2) = 0.1 and 0.1 * (-3 - -2) = -0.1; loss = -log sigmoid(0.2) = 0.598138869
    assert float(r_c) == pytest.approx(0.1) and float(r_r) == pytest.approx(-0.1)
    assert float(loss) == pytest.approx(0.598138869, rel=1e-6)
    loss, _, _ = dpo_loss(torch.tensor([-5.0]), torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), beta=0.5)
    assert float(loss) == pytest.approx(nll_sigmoid(0.5 * (0 - 2)), rel=1e-6)


class UniformLM(torch.nn.Module):
    """Logits equal over V=4 tokens everywhere: every label token has log-prob -log 4."""

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 4))


def test_sequence_logps_counts_only_labelled_tokens():
    ids = torch.tensor([[1, 2, 3, 0]])
    labels = torch.tensor([[-100, -100, 3, 0]])  # prompt 2 tokens; completion 2 tokens
    assert float(sequence_logps(UniformLM(), ids, labels)) == pytest.approx(-2 * math.log(4))
    labels = torch.tensor([[-100, -100, 3, -100]])  # padding masked
    assert float(sequence_logps(UniformLM(), ids, labels)) == pytest.approx(-math.log(4))


def lora_llama(seed: int = 0):
    tok = tiny_tokenizer()
    base = tiny_llama(tok, seed=seed)
    frozen = copy.deepcopy(base)
    model = apply_adapter(base, AdapterConfig(r=4, alpha=8), "causal_lm")
    with torch.no_grad():  # LoRA starts with B = 0 (policy == base); move it so the test can tell them apart
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model, frozen, tok


def pref_batch(tok):
    def side(prompt, completion):
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"]
        return p + c, [-100] * len(p) + c

    (ci, cl), (ri, rl) = side("what is the capital? ", "paris is the capital"), side("what is the capital? ", "i hate waiting")
    T = max(len(ci), len(ri))

    def pad(x, v):
        return x + [v] * (T - len(x))

    return {"chosen_input_ids": torch.tensor([pad(ci, 0)]), "chosen_labels": torch.tensor([pad(cl, -100)]),
            "chosen_attention_mask": torch.tensor([pad([1] * len(ci), 0)]),
            "rejected_input_ids": torch.tensor([pad(ri, 0)]), "rejected_labels": torch.tensor([pad(rl, -100)]),
            "rejected_attention_mask": torch.tensor([pad([1] * len(ri), 0)])}


def test_dpo_reference_is_the_base_model_with_the_adapter_off():
    model, frozen, tok = lora_llama()
    batch = pref_batch(tok)
    args = (batch["chosen_input_ids"], batch["chosen_labels"], batch["chosen_attention_mask"])
    with reference(model):
        implicit = sequence_logps(model, *args)
    separate = sequence_logps(frozen, *args)
    torch.testing.assert_close(implicit, separate, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(sequence_logps(model, *args), separate)  # the adapter is back on after the block
    with pytest.raises(TypeError, match="adapter.method=lora"):
        with reference(frozen):
            pass


def test_dpo_objective_matches_the_formula_and_learns():
    model, frozen, tok = lora_llama()
    batch = pref_batch(tok)
    out = DPO(beta=0.2)(model, batch)
    pc = sequence_logps(model, batch["chosen_input_ids"], batch["chosen_labels"], batch["chosen_attention_mask"])
    pr = sequence_logps(model, batch["rejected_input_ids"], batch["rejected_labels"], batch["rejected_attention_mask"])
    rc = sequence_logps(frozen, batch["chosen_input_ids"], batch["chosen_labels"], batch["chosen_attention_mask"])
    rr = sequence_logps(frozen, batch["rejected_input_ids"], batch["rejected_labels"], batch["rejected_attention_mask"])
    margin = 0.2 * ((pc - rc) - (pr - rr))
    assert float(out.loss_sum.detach()) == pytest.approx(nll_sigmoid(float(margin)), rel=1e-5)
    assert float(out.metrics["margin"]) == pytest.approx(float(margin), rel=1e-5)
    assert float(out.metrics["chosen_reward"]) == pytest.approx(float(0.2 * (pc - rc)), rel=1e-5)
    # A few steps of SGD on the pair widen the margin and lower the loss; the base weights do not move.
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    first = float(out.loss_sum)
    for _ in range(5):
        out = DPO(beta=0.2)(model, batch)
        opt.zero_grad()
        out.loss_sum.backward()
        opt.step()
    assert float(DPO(beta=0.2)(model, batch).loss_sum) < first
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_dpo_at_initialisation_is_log_2():
    tok = tiny_tokenizer()
    model = apply_adapter(tiny_llama(tok), AdapterConfig(r=4, alpha=8), "causal_lm")  # B = 0: policy == reference
    out = DPO(beta=0.1)(model, pref_batch(tok))
    assert float(out.loss_sum) == pytest.approx(math.log(2), abs=1e-6)
    assert float(out.metrics["margin"]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        DPO(beta=0)


def test_classifier_reward_is_the_label_probability():
    tok = tiny_tokenizer()
    clf = tiny_bert_classifier(tok, num_labels=3)
    reward = ClassifierReward(clf, tok, label_index=2)
    texts = ["i love this product", "i hate waiting", ""]
    got = reward(["p"] * 3, texts, [[]] * 3)
    with torch.no_grad():
        for text, r in zip(texts[:2], got):
            want = torch.softmax(clf(**tok(text, return_tensors="pt")).logits, -1)[0, 2]
            assert float(r) == pytest.approx(float(want), rel=1e-5)
    assert got.shape == (3,) and bool(((got > 0) & (got < 1)).all())  # an empty completion is still scored


def test_reward_model_reward_reads_the_single_output():
    tok = tiny_tokenizer()
    rm = tiny_bert_classifier(tok, num_labels=1)
    reward = RewardModelReward(rm, tok, pair_encoder(tok))
    got = reward(["what is the capital? "], ["paris"], [[]])
    with torch.no_grad():
        want = rm(**tok("what is the capital? paris", return_tensors="pt")).logits[0, 0]
    assert float(got[0]) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_preference_runs_train_end_to_end(tmp_path, kind, monkeypatch):
    """`gemcut train` on preference records: DPO on a tiny Llama (LoRA) and a reward model on a tiny BERT;
    validation reports pairwise accuracy; the run resumes from its checkpoint."""
    import json
    import random

    from tiny import save_tiny_bert, save_tiny_llama

    from gemcut.config import RunConfig
    from gemcut.train.run import train

    rng = random.Random(1)
    pool = "the quick brown fox jumps over lazy dog hello world paris capital france weather okay today love hate".split()
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(rng.sample(pool, 5)), "chosen": " ".join(rng.sample(pool, 4)),
                                        "rejected": " ".join(rng.sample(pool, 3))}) + "\n" for _ in range(30)))
    model = save_tiny_llama(tmp_path / "llama") if kind == "dpo" else save_tiny_bert(tmp_path / "bert", num_labels=1)
    raw = {"data": {"train": [str(data)], "split": {"validation": 0.2, "test": 0.0}, "max_length": 64, "template": "chatml"},
           "model": {"name": str(model)}, "adapter": {"method": "lora" if kind == "dpo" else "full", "r": 4},
           "objective": {"kind": kind}, "train": {"max_steps": 2, "batch_size": 4, "num_threads": 1, "save_every": 1},
           "output": {"dir": str(tmp_path / "runs"), "name": kind}}
    run_dir = train(RunConfig.model_validate(raw))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if "val_loss" in x]
    assert val and 0.0 <= val[-1]["val_accuracy"] <= 1.0 and math.isfinite(val[-1]["val_loss"])
    assert (run_dir / "final").is_dir() and (run_dir / "checkpoints" / "step-2").is_dir()
    # As if killed after step 1: drop the later checkpoint; the resumed run ends where the first one did.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step-2")
    train(RunConfig.model_validate(raw), resume=True)
    again = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in again if "loss" in x and "val_loss" not in x] == [1, 2]
    assert [x for x in again if "val_loss" in x][-1]["val_loss"] == pytest.approx(val[-1]["val_loss"], rel=1e-5)
