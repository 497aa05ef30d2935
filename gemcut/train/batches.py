"""Batch sources: what the training loop draws each optimizer step from.

    python -m pytest -q tests/test_loop.py

The loop (gemcut/train/loop.py) knows neither the data nor the objective: at each step it asks its source for
a `Step` at the run's data position (epoch, index in the epoch's order) and trains on it. Two sources exist:

- `ExampleSource`: tokenized examples, batched by a collator (causal LM, classification, preference pairs);
- `RolloutSource` (gemcut/train/rollouts.py): prompts, from which the policy samples and a reward scores
  the completions that become the batches (GRPO, PPO).

The data order of epoch e is a permutation drawn from (seed, e), with length grouping batches of similar
lengths, so the position (epoch, index) is all that resume needs to continue exactly.

A data mixture (`data.mixture`, gemcut/data/mixture.py) draws instead: each example of epoch e comes from a
source picked with its sampling share, and is that source's next example in a seeded shuffle of its own
(`mixture_order`); all of it is drawn from (seed, e), so the mixture's position is the same (epoch, index) and a
resumed run draws what the uninterrupted one would have. An epoch is as many draws as there are examples.
Its batches are never grouped by length: each source's examples have lengths of their own (tweets against
conversations), so a length-grouped batch would hold one source's examples instead of the shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch

from gemcut.config import MixtureConfig, TrainConfig
from gemcut.data import collate as C
from gemcut.data.mixture import sampling_shares
from gemcut.data.records import SOURCE_FIELD
from gemcut.tasks import Task
from gemcut.train.distributed import Group, micro_batch_size

Batch = dict[str, torch.Tensor]
GROUP_BATCHES = 50  # length grouping sorts windows of this many batches, like HF's megabatches


@dataclass
class Step:
    """One optimizer step's data, this process's share of it.

    `updates`: the optimizer updates the step makes, each a list of micro-batches whose gradients accumulate
    (one update for examples; `objective.rl.ppo_epochs` over the same rollouts for RL). `examples`: how far the
    step moves the data position. `tokens`: real tokens seen (padding excluded). `metrics`: host numbers
    logged with the step (reward, KL, ...); `samples`: lines for samples.jsonl; `warnings`: printed and logged.
    `trained_tokens`: tokens with a loss, when the objective's targets are not tokens (GRPO counts completions).
    `tokens` and `trained_tokens` count this process's share; the loop adds them up over the processes.
    `weights`: one per micro-batch of an update (default all 1). A weight of 0 marks a filler: a micro-batch
    run only so that this process makes as many forward and backward passes as the others (a short last
    step on many processes; FSDP2 gathers parameters at every pass), adding nothing to the loss.
    """

    updates: list[list[Batch]]
    examples: int
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    trained_tokens: int | None = None
    weights: list[float] | None = None

    def weights_of(self, batches: list) -> list[float]:
        return self.weights if self.weights is not None else [1.0] * len(batches)


class BatchSource(Protocol):
    """What the loop needs from a source of batches."""

    #: optimizer updates per step (the scheduler counts updates)
    updates_per_step: int

    def __len__(self) -> int:
        """Examples (or prompts) in one epoch."""

    def examples_per_step(self) -> int:
        """Examples (or prompts) one step takes, over all processes (`train.batch_size`)."""

    def step(self, model: torch.nn.Module, *, epoch: int, index: int, step: int, group: Group) -> Step:
        """This process's share of the step starting at position (epoch, index); `step` is the number of the
        step about to run."""


def example_length(example: dict) -> int:
    """Tokens in an example: `input_ids`, or both sides of a preference pair (`chosen_input_ids`, ...)."""
    return sum(len(v) for k, v in example.items() if k.endswith("input_ids"))


def epoch_order(lengths: Sequence[int], *, seed: int, epoch: int, batch_size: int, group_by_length: bool) -> list[int]:
    """Example indices in the order epoch `epoch` visits them; consecutive `batch_size` slices are batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length:
        return order
    return grouped_by_length(order, lengths, batch_size, g)


def mixture_order(sources: Sequence[str], shares: dict[str, float], *, seed: int, epoch: int) -> list[int]:
    """Example indices of epoch `epoch` of a mixture: `len(sources)` draws, each picking a source by `shares`
    (name -> probability) and taking that source's next example in a seeded shuffle of its examples, shuffled
    again each time it runs out (a small source with a large share repeats; a large one is sampled)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    names = [n for n in shares if shares[n] > 0]
    members = {n: [i for i, s in enumerate(sources) if s == n] for n in names}
    probs = torch.tensor([shares[n] for n in names], dtype=torch.float64)
    draws = torch.multinomial(probs, len(sources), replacement=True, generator=g).tolist()
    streams: dict[str, list[int]] = {n: [] for n in names}
    order = []
    for d in draws:
        name = names[d]
        if not streams[name]:
            streams[name] = [members[name][i] for i in torch.randperm(len(members[name]), generator=g).tolist()][::-1]
        order.append(streams[name].pop())
    return order


def grouped_by_length(order: list[int], lengths: Sequence[int], batch_size: int, g: torch.Generator) -> list[int]:
    """`order` with length grouping: longest first inside windows of GROUP_BATCHES batches, then the batches shuffled."""
    window = batch_size * GROUP_BATCHES  # longest first inside each window, then batches shuffled
    order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


def resolve_group_by_length(setting: bool | str, padding_free: bool) -> bool:
    """`train.group_by_length`: "auto" groups batches by length unless the model runs padding-free, which pays
    for padding only inside attention and so keeps uniformly random batches (a length-grouped batch holds
    examples of one length, and its gradient is not that of a random sample)."""
    return not padding_free if setting == "auto" else bool(setting)


def deal(items: list, size: int, group: Group, *, even: bool = True) -> tuple[list[list], list[float]]:
    """(this process's micro-batches, their weights): `items` cut into chunks of `size`, dealt round-robin to
    the processes. `even`: every process gets as many chunks as the first, the missing ones filled with the
    first chunk at weight 0; else only a process left without any gets that filler."""
    chunks = [items[s:s + size] for s in range(0, len(items), size)]
    mine = group.share(chunks)
    want = -(-len(chunks) // group.world) if even else max(1, len(mine))
    fillers = want - len(mine) if chunks else 0
    return mine + [chunks[0]] * fillers, [1.0] * len(mine) + [0.0] * fillers


def collator_for(task: Task, pad_id: int) -> Callable[[list[dict]], Batch]:
    """The collator of the task's batches (the table's `batches`); rollout batches are built by their source."""
    collators = {"causal": C.collate_causal, "classify": C.collate_classify, "preference": C.collate_preference}
    return partial(collators[task.batches], pad_id=pad_id)


class ExampleSource:
    """Tokenized examples in the epoch's seeded order: per step, `train.batch_size` examples cut into
    micro-batches (`micro_batch_size`) dealt to the processes, collated; one update per step. Length grouping
    sorts within windows of micro-batches of the one-process size, so the order does not depend on how many
    processes share it."""

    updates_per_step = 1

    def __init__(self, examples: Sequence[dict], collate: Callable[[list[dict]], Batch], train: TrainConfig, *,
                 group_by_length: bool, mixture: MixtureConfig | None = None):
        self.examples, self.collate, self.train = examples, collate, train
        self.batch_size, self.seed, self.grouped = train.batch_size, train.seed, group_by_length
        self.lengths = [example_length(ex) for ex in examples]
        self._order: tuple[int, list[int]] | None = None  # (epoch, order), drawn once per epoch
        self.sources: list[str] | None = None
        self.shares: dict[str, float] | None = None  # a mixture's sampling share of each source, by name
        if mixture is not None:
            self.sources = [ex.get(SOURCE_FIELD) for ex in examples]
            if None in self.sources:
                raise ValueError(f"data.mixture is set but training example {self.sources.index(None)} has no {SOURCE_FIELD}; "
                                 "prepare the data with the mixture (gemcut/data/prepare.py)")
            sizes: dict[str, int] = {}
            for name in self.sources:
                sizes[name] = sizes.get(name, 0) + 1
            self.shares = sampling_shares(mixture, sizes)

    def __len__(self) -> int:
        return len(self.examples)

    def examples_per_step(self) -> int:
        return self.batch_size

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            size = micro_batch_size(self.train, 1)
            if self.shares is None:
                order = epoch_order(self.lengths, seed=self.seed, epoch=epoch, batch_size=size, group_by_length=self.grouped)
            else:  # never length-grouped: a source's examples have lengths of their own, so a grouped batch would hold one source
                order = mixture_order(self.sources, self.shares, seed=self.seed, epoch=epoch)
            self._order = (epoch, order)
        return self._order[1]

    def step(self, model, *, epoch: int, index: int, step: int, group: Group) -> Step:
        take = self.order(epoch)[index:index + self.batch_size]
        micro, weights = deal(take, micro_batch_size(self.train, group.world), group)
        batches = [self.collate([self.examples[i] for i in ids]) for ids in micro]
        tokens = sum(self.lengths[i] for ids, w in zip(micro, weights) if w for i in ids)
        # A mixture logs how many of the step's examples each source gave (the whole step's, on every process).
        drawn = {f"examples_{name}": float(sum(self.sources[i] == name for i in take)) for name in self.shares or {}}
        return Step([batches], len(take), tokens, metrics=drawn, weights=weights)
