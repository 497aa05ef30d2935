"""Per-step numbers kept on the device until a log step or a save, then checked and written in one sync.

    python -m pytest -q tests/test_loop.py tests/test_train_faults.py

The loop adds each step's loss, gradient norm and the largest trainable weight as device tensors (reading
them would make the host wait for the step); `flush` brings them over at once, runs the guard on each step
in order (gemcut/train/guard.py: non-finite values stop the run, a collapse is noted), and writes one metric
line for the steps since the last flush: their mean loss and mean step metrics, the last learning rate and
gradient norm, and the throughput. On several processes the numbers are those of the whole step (one
all-reduce per flush), and only the main process writes them.
"""

from __future__ import annotations

import time

import torch

from gemcut.train import guard
from gemcut.train.distributed import Group
from gemcut.train.logging import RunLogger


class StepLog:
    def __init__(self, log: RunLogger, state, params: list[torch.Tensor], collapse_watch: guard.CollapseWatch | None,
                 group: Group, *, fix: str):
        self.log, self.state, self.params, self.watch, self.group, self.fix = log, state, params, collapse_watch, group, fix
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float, dict]] = []
        self.collapsed = ""  # the collapse message, once the watch has seen one
        self.restart_clock()

    def restart_clock(self) -> None:
        """Throughput counts from now (evaluation and saving are not training)."""
        self.t_log, self.tokens_log = time.time(), (self.state.tokens, self.state.trained_tokens)

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, metrics: dict) -> None:
        self.pending.append((step, loss, grad_norm, guard.weights_max_abs(self.params), lr, metrics))

    def flush(self, last_good) -> None:
        """Sync the values kept since the last flush: stop on NaN/inf, watch for a collapse, log."""
        if not self.pending:
            return
        names = list(self.pending[-1][5])
        rows = [torch.stack([l_, g_, w_, *(torch.as_tensor(m.get(k, 0.0), dtype=torch.float32, device=l_.device) for k in names)])
                for _, l_, g_, w_, _, m in self.pending]
        # One all-reduce for the lot. Each process divided its summed loss by the mean target count per process,
        # so the mean over processes is the step's loss; norms and the largest weight are the same on every
        # process (and a mean keeps a NaN); step metrics are averaged.
        values = self.group.mean(torch.stack(rows).float()).tolist()
        for (step, *_), (loss, gnorm, weights, *_) in zip(self.pending, values):
            guard.check_finite(step, loss=loss, grad_norm=gnorm, weights=weights, params=self.params, now=self.state.step,
                               last_good=last_good, fix=self.fix)
            if self.watch is not None and not self.collapsed:
                self.collapsed = self.watch.update(step, loss, gnorm) or ""
        state, seconds = self.state, max(time.time() - self.t_log, 1e-9)
        tokens, trained = state.tokens - self.tokens_log[0], state.trained_tokens - self.tokens_log[1]
        means = {k: sum(row[3 + i] for row in values) / len(values) for i, k in enumerate(names)}
        self.log.log({"step": self.pending[-1][0], "epoch": state.epoch, "loss": sum(v[0] for v in values) / len(values),
                      "lr": self.pending[-1][4], "grad_norm": values[-1][1], **means, "tokens": tokens,
                      "trained_tokens": trained, "tokens_per_s": tokens / seconds, "trained_tokens_per_s": trained / seconds,
                      "tokens_total": state.tokens, "trained_tokens_total": state.trained_tokens})
        self.restart_clock()
        self.pending.clear()
