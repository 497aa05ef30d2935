"""The training loop on tiny random models: pinned losses, accumulation invariance, NaN guard, early
stopping and pruning, Ctrl-C, schedule and data order.

    python -m pytest -q tests/test_loop.py
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from accelerate import Accelerator
from train_helpers import (
    bert,
    causal_examples,
    class_examples,
    collate_causal,
    collate_classify,
    config,
    deterministic,
    fit_examples,
    llama,
    train_losses,
)

from gemcut.errors import TrainingError
from gemcut.objectives import CausalLM, Classify
from gemcut.run_folder import best_checkpoint, complete_checkpoints, latest_checkpoint
from gemcut.train.batches import epoch_order
from gemcut.train.bf16 import store_frozen_linears_in_bf16
from gemcut.train.loop import backward_step
from gemcut.train.schedule import lr_multiplier, warmup_steps_for
from gemcut.train.validation import Validation, macro_f1_from_confusion

# Recorded from the fixed runs below (fp32, 1 thread, deterministic algorithms); a change in the loop's
# numerics, data order, schedule or objective shows up here.
PINNED_CAUSAL = [5.957554340362549, 5.933615207672119, 5.973154067993164, 5.951292514801025, 5.9609880447387695]
PINNED_CLASSIFY = [1.1082435846328735, 1.0995690822601318, 1.1399062871932983, 1.1186411380767822, 1.0914244651794434]


@pytest.fixture(autouse=True)
def _deterministic():
    deterministic()


def test_pinned_per_step_losses(tmp_path):
    fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, config=config(max_steps=5), run_dir=tmp_path / "lm")
    assert list(train_losses(tmp_path / "lm").values()) == pytest.approx(PINNED_CAUSAL, rel=1e-5)
    fit_examples(bert(), Classify(), class_examples(), collate_classify, config=config(max_steps=5), run_dir=tmp_path / "cls")
    assert list(train_losses(tmp_path / "cls").values()) == pytest.approx(PINNED_CLASSIFY, rel=1e-5)


def test_batch_8x1_equals_1x8_with_accumulation(tmp_path):
    """Same loss and same gradients, whether 8 examples go in one micro-batch or in 8 accumulated ones."""
    examples = causal_examples(8, seed=11)
    acc = Accelerator(cpu=True)
    grads, losses = [], []
    for split in (8, 1):
        model = llama()
        batches = [collate_causal(examples[s:s + split]) for s in range(0, 8, split)]
        n_step = sum(CausalLM().count(b) for b in batches)
        losses.append(backward_step(model, CausalLM(), batches, n_step=n_step, accelerator=acc, precision="fp32")[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)
    # and through the whole loop: three optimizer steps, batch 8 x 1 vs batch 1 x 8
    for batch, accum in ((8, 1), (1, 8)):
        fit_examples(llama(), CausalLM(), causal_examples(24), collate_causal, run_dir=tmp_path / f"b{batch}",
            config=config(max_steps=3, batch_size=batch * accum, micro_batch_size=batch, group_by_length=False))
    assert list(train_losses(tmp_path / "b8").values()) == pytest.approx(list(train_losses(tmp_path / "b1").values()), rel=1e-5)


class NaNAt:
    """Objective wrapper whose loss becomes NaN from training step `step` on."""

    task = "causal_lm"

    def __init__(self, step: int):
        self.inner, self.step, self.calls = CausalLM(), step, 0

    def count(self, batch):
        return self.inner.count(batch)

    def __call__(self, model, batch):
        out = self.inner(model, batch)
        if model.training:
            self.calls += 1
            if self.calls >= self.step:
                out.loss_sum = out.loss_sum * float("nan")
        return out


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError) as err:
        fit_examples(llama(), NaNAt(4), causal_examples(), collate_causal, run_dir=tmp_path,
            config=config(max_steps=8, save_every=2, log_every=3))
    message = str(err.value)
    assert "loss is nan at step 4" in message
    assert str(tmp_path / "checkpoints" / "step-2") in message
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-2"  # nothing saved after the NaN


class Scripted(Validation):
    """A validation that reports the given losses in turn."""

    def __init__(self, losses):
        self.losses = iter(losses)

    def __call__(self, model, group):
        return {"val_loss": next(self.losses), "val_targets": 1}, []


def test_early_stopping_keeps_best_and_prunes(tmp_path):
    result = fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path,
                          validation=Scripted([3.0, 2.0, 2.5, 2.6, 2.7, 2.8]),
                 config=config(max_steps=20, eval_every=2, keep_last_n=1, early_stopping={"patience": 3}))
    assert result.stopped == "early_stopped" and result.state.step == 10  # best at 4; 6, 8, 10 without gain
    names = [p.name for p in complete_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-4", "step-10"]  # keep_last_n=1 plus the best
    assert best_checkpoint(tmp_path / "checkpoints").name == "step-4"
    assert result.best_checkpoint.name == "step-4" and result.state.best_metric == 2.0
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [e["step"] for e in evals] == [2, 4, 6, 8, 10]


def test_patience_running_out_on_the_last_step_is_a_completed_run(tmp_path):
    result = fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path,
                          validation=Scripted([3.0, 2.0, 2.5, 2.6, 2.7]),
                 config=config(max_steps=10, eval_every=2, early_stopping={"patience": 3}))
    assert result.stopped == "completed" and result.state.step == 10
    assert result.best_checkpoint.name == "step-4"


def test_validation_loss_equals_training_loss_on_the_same_examples(tmp_path):
    """One step over all examples at a negligible learning rate: the step's loss is the validation loss."""
    examples = causal_examples(12, seed=2)
    fit_examples(llama(), CausalLM(), examples, collate_causal, run_dir=tmp_path, val_set=examples,
        config=config(max_steps=1, batch_size=12, lr=1e-12))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["val_loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    assert rows[1]["val_targets"] == rows[0]["trained_tokens"]


def test_classify_validation_accuracy_and_unknown_metric(tmp_path):
    fit_examples(bert(), Classify(), class_examples(), collate_classify, run_dir=tmp_path / "a", val_set=class_examples(9, seed=1),
        config=config(max_steps=2, early_stopping={"metric": "val_accuracy", "mode": "max"}))
    evals = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(evals) == 1 and 0.0 <= evals[0]["val_accuracy"] <= 1.0 and evals[0]["val_targets"] == 9
    assert 0.0 <= evals[0]["val_macro_f1"] <= 1.0
    with pytest.raises(TrainingError, match="val_f1.*val_accuracy"):
        fit_examples(bert(), Classify(), class_examples(), collate_classify, run_dir=tmp_path / "b", val_set=class_examples(3),
            config=config(max_steps=1, early_stopping={"metric": "val_f1", "mode": "max"}))


def test_validation_macro_f1_matches_scikit_learn():
    """Classify counts (true, predicted) pairs; the loop's macro-F1 from those counts equals scikit-learn's,
    including a class that never occurs (left out of the average, as scikit-learn does)."""
    from sklearn.metrics import f1_score

    class FixedLogits(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.logits})()

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 3, 3, 0, 1, 3])  # class 2 never occurs in truth
    model = FixedLogits()
    model.logits = torch.randn(10, 4, generator=g)
    model.logits[:, 2] = -1e9  # ... nor in predictions
    out = Classify()(model, {"input_ids": torch.zeros(10, 2, dtype=torch.long), "labels": labels})
    predicted = model.logits.argmax(-1)
    assert int(out.metrics["confusion"].sum()) == 10
    expected = f1_score(labels.tolist(), predicted.tolist(), average="macro", zero_division=0)
    assert macro_f1_from_confusion(out.metrics["confusion"]) == pytest.approx(expected, abs=1e-12)


class InterruptAt(CausalLM):
    """Sends this process a SIGINT during training step `step`, as Ctrl-C would."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.calls = step, 0

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.step:
                os.kill(os.getpid(), signal.SIGINT)
        return super().__call__(model, batch)


def test_ctrl_c_saves_and_resume_continues(tmp_path):
    result = fit_examples(llama(), InterruptAt(3), causal_examples(), collate_causal, run_dir=tmp_path, config=config(max_steps=6))
    assert result.stopped == "interrupted" and result.state.step == 3
    assert result.last_checkpoint.name == "step-3"
    result = fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path, config=config(max_steps=6), resume=True)
    assert result.stopped == "completed" and result.state.step == 6
    fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path / "straight", config=config(max_steps=6))
    assert train_losses(tmp_path) == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-6)


def test_schedule_warmup_then_decay():
    assert warmup_steps_for(100, None, 0.03) == 3 and warmup_steps_for(10, 20, 0.0) == 10
    cos = [lr_multiplier(s, total_steps=10, warmup=2, kind="cosine") for s in range(10)]
    assert cos[:2] == [1 / 3, 2 / 3] and cos[2] == 1.0 and all(a > b for a, b in zip(cos[2:], cos[3:]))
    assert lr_multiplier(9, total_steps=10, warmup=0, kind="linear") == pytest.approx(0.1)
    assert lr_multiplier(9, total_steps=10, warmup=2, kind="constant") == 1.0


def test_epoch_order_is_seeded_permutation_with_length_groups():
    lengths = [i % 17 + 1 for i in range(200)]
    a = epoch_order(lengths, seed=1, epoch=0, batch_size=8, group_by_length=True)
    assert sorted(a) == list(range(200))
    assert a == epoch_order(lengths, seed=1, epoch=0, batch_size=8, group_by_length=True)
    assert a != epoch_order(lengths, seed=1, epoch=1, batch_size=8, group_by_length=True)
    spread = [max(lengths[i] for i in a[s:s + 8]) - min(lengths[i] for i in a[s:s + 8]) for s in range(0, 200, 8)]
    assert sum(spread) / len(spread) < 2  # random batches of 8 would spread about 13
    assert sorted(epoch_order(lengths, seed=1, epoch=0, batch_size=8, group_by_length=False)) == list(range(200))


def test_frozen_linears_in_bf16_give_the_same_results_under_autocast():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero; make the adapter matter
            torch.nn.init.normal_(p, std=0.02)
    batch = collate_causal(causal_examples(4, seed=9))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = CausalLM()(model, batch)
        out.loss_sum.backward()
        return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = loss_and_grads()
    assert store_frozen_linears_in_bf16(model) == 2 * 7  # q k v o gate up down in 2 blocks; lm_head is tied
    assert model.get_base_model().lm_head.weight.dtype == torch.float32
    after = loss_and_grads()
    assert torch.equal(before[0], after[0])
    for name, grad in before[1].items():
        assert torch.equal(grad, after[1][name]), name
    assert store_frozen_linears_in_bf16(llama()) == 0  # not a peft model: untouched


class ShareOf:
    """A process `rank` of `world`, as batch sources see one (gemcut/train/distributed.py's Group)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def share(self, items):
        return items[self.rank::self.world]


def test_micro_batches_are_dealt_evenly_with_fillers_of_weight_zero():
    """Every process makes as many passes (FSDP2 gathers at each); a short share is topped up with the first
    micro-batch at weight 0, and all real micro-batches are dealt exactly once."""
    from gemcut.train.batches import deal

    items = list(range(10))  # chunks of 3: [0,1,2] [3,4,5] [6,7,8] [9]
    shares = [deal(items, 3, ShareOf(r, 3)) for r in range(3)]
    assert shares[0] == ([[0, 1, 2], [9]], [1.0, 1.0])
    assert shares[1] == ([[3, 4, 5], [0, 1, 2]], [1.0, 0.0])
    assert shares[2] == ([[6, 7, 8], [0, 1, 2]], [1.0, 0.0])
    dealt = sorted(i for chunks, weights in shares for c, w in zip(chunks, weights) if w for i in c)
    assert dealt == items
    # RL deals unevenly (sampling cannot run in step anyway): only an empty share gets a filler
    assert deal(items[:3], 3, ShareOf(1, 2), even=False) == ([[0, 1, 2]], [0.0])
    assert deal(items, 3, ShareOf(1, 3), even=False) == ([[3, 4, 5]], [1.0])


def test_a_filler_micro_batch_adds_nothing_to_loss_or_gradients():
    acc = Accelerator(cpu=True)
    examples = causal_examples(8, seed=5)
    real, filler = collate_causal(examples[:4]), collate_causal(examples[4:])
    results = []
    for batches, weights in (([real], None), ([real, filler], [1.0, 0.0])):
        model = llama()
        n = CausalLM().count(real)
        loss, _ = backward_step(model, CausalLM(), batches, n_step=n, accelerator=acc, precision="fp32", weights=weights)
        results.append((loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)
