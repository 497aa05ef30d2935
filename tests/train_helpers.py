"""Synthetic tokenized data and a fixed tiny run for the training-engine tests.

    python -m pytest -q tests/test_loop.py tests/test_checkpoint.py

The examples are random token ids with the first half of each masked (-100, like a prompt) and the
collator pads on the right, so the tests do not depend on the data layer. `tiny_run` is the fixed run the
resume tests repeat; with `hang_at` it sleeps inside that step, so that a test can SIGKILL it there.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_bert_classifier, tiny_llama, tiny_tokenizer  # noqa: E402

from gemcut.config import RunConfig  # noqa: E402
from gemcut.objectives import CausalLM  # noqa: E402

PAD = 0


def fit_examples(model, objective, train_set, collate, *, config: RunConfig, run_dir, val_set=None, sample_fn=None, **kw):
    """`gemcut.train.loop.fit` over tokenized examples, as `gemcut train` calls it: an ExampleSource, and a
    LossValidation when there is a validation set; the task is the objective's (gemcut/tasks.py)."""
    from gemcut.models.fast import applied
    from gemcut.tasks import task_named
    from gemcut.train.batches import ExampleSource, resolve_group_by_length
    from gemcut.train.loop import fit
    from gemcut.train.validation import LossValidation

    grouped = resolve_group_by_length(config.train.group_by_length, "padding_free" in applied(model))
    source = ExampleSource(train_set, collate, config.train, group_by_length=grouped)
    validation = kw.pop("validation", None)
    if val_set:
        validation = LossValidation(objective, val_set, collate, batch_size=config.train.batch_size, sample_fn=sample_fn)
    return fit(model, objective, source, config=config, task=task_named(objective.task), run_dir=run_dir, validation=validation, **kw)


def deterministic() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def causal_examples(n: int = 32, seed: int = 0, vocab: int = 300, lengths: tuple[int, int] = (6, 20)) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randrange(*lengths)
        ids = [rng.randrange(5, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


def collate_causal(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)

    def pad(seq, value):
        return seq + [value] * (width - len(seq))

    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], PAD) for e in examples]),
        "labels": torch.tensor([pad(e["labels"], -100) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
    }
    if any("loss_weight" in e for e in examples):
        batch["loss_weight"] = torch.tensor([pad(e.get("loss_weight", [1.0] * len(e["input_ids"])), 0.0) for e in examples])
    return batch


def class_examples(n: int = 24, seed: int = 0, num_labels: int = 3, vocab: int = 300) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(5, vocab) for _ in range(rng.randrange(4, 12))], "label": i % num_labels} for i in range(n)]


def collate_classify(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    return {
        "input_ids": torch.tensor([e["input_ids"] + [PAD] * (width - len(e["input_ids"])) for e in examples]),
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]),
        "labels": torch.tensor([e["label"] for e in examples]),
    }


def config(**train) -> RunConfig:
    base = {"precision": "fp32", "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "seed": 0}
    return RunConfig.model_validate({"train": {**base, **train}})


def llama():
    return tiny_llama(tiny_tokenizer(), seed=0)


def bert(num_labels: int = 3):
    return tiny_bert_classifier(tiny_tokenizer(), num_labels=num_labels, seed=0)


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# The fixed run used by the resume tests: 32 examples, batch 4 -> 8 steps an epoch, 12 steps, saves every 3.
TINY_RUN = {"max_steps": 12, "save_every": 3, "keep_last_n": 5}


class HangAt:
    """Objective wrapper that announces itself and sleeps inside step `step` (so a parent can SIGKILL it)."""

    def __init__(self, inner, step: int, ready: Path, micro_per_step: int = 1):
        self.inner, self.task, self.calls = inner, inner.task, 0
        self.step, self.ready, self.micro = step, ready, micro_per_step

    def count(self, batch):
        return self.inner.count(batch)

    def __call__(self, model, batch):
        if model.training:  # evaluation batches do not count
            self.calls += 1
            if self.calls > (self.step - 1) * self.micro:
                self.ready.write_text("hanging")
                time.sleep(600)
        return self.inner(model, batch)


def tiny_run(run_dir: Path, *, resume: bool = False, hang_at: int | None = None):
    deterministic()
    objective = CausalLM()
    if hang_at is not None:
        objective = HangAt(objective, hang_at, Path(run_dir).with_suffix(".ready"))
    return fit_examples(llama(), objective, causal_examples(), collate_causal, config=config(**TINY_RUN), run_dir=run_dir,
               data_hash="synthetic-v1", resume=resume)

