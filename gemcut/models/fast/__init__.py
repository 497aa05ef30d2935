"""Exact speed tricks for training, behind one switch: `train.fast`.

    python -m pytest -q tests/test_fast.py tests/test_first_token.py tests/test_padding_free.py tests/test_fast_dropout.py tests/test_recompute.py

Each trick replaces the forward of some transformers module instances with code that computes the same
thing faster, and each has a test that the logits and gradients are unchanged:

| trick          | file             | for                                         | what it saves                              |
|----------------|------------------|---------------------------------------------|--------------------------------------------|
| `padding_free` | padding_free.py  | BERT/RoBERTa/XLM-R/ELECTRA classifiers      | the linear layers never see padding        |
| `first_token`  | first_token.py   | the same, when the head reads the 1st token | the last layer at position 0 only          |
| `fast_dropout` | fast_dropout.py  | every model with dropout                    | a cheaper mask draw, same keep probability |
| `selective`    | recompute.py     | Llama, Mistral, Qwen2/3 decoders            | memory: norms and SiLU recomputed, not kept |

`apply_fast(model, task, train_cfg)` is the one way in: with `train.fast` on it applies what fits the model
and task (`fast_dropout` only with `train.fast_dropout` too) and returns the names of the tricks the model
now runs, which the run writes to its manifest; with `train.fast` off it applies nothing, and the model runs
transformers' own forwards (tests/test_fast.py: the same logits, gradients and training losses either way).
`applied(model)` says which tricks a model runs, for code that must know (a padding-free model needs no
length-grouped batches). Mean pooling is not a trick: it is a head (gemcut/models/pooling.py), installed
by the loader whatever `train.fast` says; choose it before calling `apply_fast`.

`selective` is not one of TRICKS: it trades a little time for memory, so `train.activation_checkpointing`
chooses it, with the other activation plans (none, full), through `recompute.apply_plan`, whatever
`train.fast` says; `recompute.plan_of(model)` says which plan a model runs, and the run's manifest records it.

The tricks call parts of transformers' modules by name; each module's RELIES_ON lists them and
`apply_fast` raises FastPathError naming the trick and the missing attribute when a transformers release
has moved one (bert_layout.py; tests/test_fast.py checks them against the installed transformers).
"""

from __future__ import annotations

import torch

from gemcut.models.fast import fast_dropout, first_token, padding_free
from gemcut.models.fast.bert_layout import FastPathError
from gemcut.models.pooling import classifier_pooling
from gemcut.tasks import Task

TRICKS = {"padding_free": padding_free, "first_token": first_token, "fast_dropout": fast_dropout}

__all__ = ["TRICKS", "FastPathError", "applied", "apply_fast"]


def apply_fast(model: torch.nn.Module, task: Task, train_cfg) -> list[str]:
    """Apply the tricks that fit `model` and `task` when `train_cfg.fast` (a TrainConfig) is on; returns
    `applied(model)`, the names of the tricks the model runs, in TRICKS order.

    Call it after the pooling is chosen (`prepare_classifier`, done by the loader) and, for LoRA, before or
    after `apply_adapter` alike (peft wraps the Linear modules the tricks call)."""
    if train_cfg.fast:
        if task.classifier:
            padding_free.use_padding_free_encoder(model)
            if classifier_pooling(model) != "mean":  # the first-token layer would leave nothing to average
                first_token.last_layer_reads_first_token_only(model)
        if train_cfg.fast_dropout:
            fast_dropout.use_fast_dropout(model)
    return applied(model)


def applied(model: torch.nn.Module) -> list[str]:
    """The names of the tricks `model` (or the model inside a peft / DDP wrapper) runs, in TRICKS order."""
    return [name for name, trick in TRICKS.items() if trick.installed(model)]
