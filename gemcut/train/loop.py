"""The one training loop: `fit(model, objective, source, ...)`, for every task.

    python -m pytest -q tests/test_loop.py

It knows neither the data nor the objective. Each step it asks its batch source (gemcut/train/batches.py:
tokenized examples; gemcut/train/rollouts.py: RL rollouts) for the step at the run's data position, and makes
the step's optimizer updates: every micro-batch's summed loss is divided by the target count of the *whole*
update (on all processes), so batch 8 x 1 and batch 1 x 8 with accumulation, or 1 and 2 processes, give the
same update. On several processes (torchrun or accelerate launch; gemcut/train/distributed.py) accelerate wraps
the model in DDP, or FSDP2 shards it; only the main process writes; an interrupt stops every process at the
same step; a peer that dies ends the run naming the last good checkpoint. AdamW over the trainable parameters,
warmup + cosine/linear/constant schedule, gradient clipping. Losses, gradient norms and the largest trainable
weight stay on the device until a log step or a save, where the guard checks them (gemcut/train/guard.py): a
NaN or inf stops the run naming the step and the last good checkpoint (no checkpoint holds a poisoned update),
and a model stuck at the loss of a uniform guess stops as "collapsed". A validation (gemcut/train/validation.py)
runs every `train.eval_every` steps and at the end; its watched metric picks the best checkpoint and early
stopping. Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and returns.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from gemcut.config import RunConfig
from gemcut.errors import TrainingError
from gemcut.models.precision import autocast, resolve_precision
from gemcut.objectives.base import Objective
from gemcut.tasks import Task
from gemcut.train import checkpoint as ckpt
from gemcut.train import guard
from gemcut.train.batches import Batch, BatchSource
from gemcut.train.bf16 import store_frozen_linears_in_bf16
from gemcut.train.distributed import Group, lost_processes, shard, sharded, start, whole
from gemcut.train.logging import RunLogger, SilentLogger
from gemcut.train.optimizer import adamw, param_groups
from gemcut.train.schedule import build_scheduler, warmup_steps_for
from gemcut.train.step_log import StepLog
from gemcut.train.validation import Validation


@dataclass
class FitResult:
    state: ckpt.TrainState
    stopped: str  # "completed", "early_stopped", "interrupted" or "collapsed"
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    precision: str
    seconds: float
    reason: str = ""  # interrupted: the signal ("SIGINT", "SIGTERM"); collapsed: what happened and the fix


def backward_step(model, objective: Objective, batches: Sequence[Batch], *, n_step: float, accelerator, precision: str,
                  weights: Sequence[float] | None = None):
    """Accumulate the gradients of one optimizer update; returns (its loss, the mean over its `n_step` targets;
    the objective's summed metrics).

    Every micro-batch's summed loss is divided by the update's total target count before its backward, so the
    accumulated gradient is that of the mean over all the update's targets, however they are split. A weight
    of 0 runs a filler batch for the collectives alone (gemcut/train/batches.py, `Step.weights`)."""
    step_loss, metrics = torch.zeros((), device=accelerator.device), {}
    weights = weights or [1.0] * len(batches)
    for k, (batch, weight) in enumerate(zip(batches, weights)):
        batch = {key: v.to(accelerator.device, non_blocking=True) for key, v in batch.items()}
        # DDP: all-reduce the gradients once, after the last micro-batch
        sync = contextlib.nullcontext() if k == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            with autocast(precision, accelerator.device):
                out = objective(model, batch)
            loss = out.loss_sum * weight / max(n_step, 1)
            accelerator.backward(loss)
        step_loss += loss.detach()
        for name in getattr(objective, "logged", ()):
            metrics[name] = metrics.get(name, 0) + out.metrics[name].detach() * weight / max(n_step, 1)
    return step_loss, metrics


def fit(model: torch.nn.Module, objective: Objective, source: BatchSource, *, config: RunConfig, task: Task, run_dir: Path,
        validation: Validation | None = None, data_hash: str = "", resume: bool | str = False,
        logger: RunLogger | None = None, group: Group | None = None) -> FitResult:
    """Train `model` in place on the steps `source` gives, with `objective`; see the module docstring.

    The main process of `group` (gemcut/train/distributed.py; by default this process alone) writes
    `run_dir/metrics.jsonl`, `samples.jsonl`, `tb/` and `checkpoints/`. With `resume` (True, or a
    checkpoint's name `step-N`), continues from the newest complete checkpoint, or that one, after checking
    that it is intact and made from this data and config. Under bf16 the frozen linear weights of a LoRA
    model stay in bf16 afterwards (gemcut/train/bf16.py): call the model inside `gemcut.models.precision.autocast`."""
    cfg, t0 = config.train, time.time()
    group = group or start(cfg)
    set_seed(cfg.seed)
    acc, fsdp2 = group.accelerator, sharded(cfg, group)
    precision = resolve_precision(cfg.precision, acc.device)
    if precision == "bf16" and not fsdp2:  # FSDP2 gathers a block's parameters in one dtype
        store_frozen_linears_in_bf16(model)
    choices = guard.uniform_choices(model, task)
    collapse_watch = guard.CollapseWatch(choices, cfg.lr) if choices else None
    if fsdp2:
        shard(model.to(acc.device), cfg, group)  # before the optimizer, which then holds the shards
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_lr_decay)
    if not groups:
        raise TrainingError("no trainable parameters: check adapter.method and adapter.target_modules")
    optimizer = adamw(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if not fsdp2:  # DDP (or one process): accelerate wraps the model
        model, optimizer = acc.prepare(model, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    inner = acc.unwrap_model(model)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(source) / source.examples_per_step())))
    updates = total * source.updates_per_step
    scheduler = build_scheduler(optimizer, total_steps=updates, kind=cfg.schedule,
                                warmup=warmup_steps_for(updates, cfg.warmup_steps, cfg.warmup_ratio))
    root, config_dict = Path(run_dir) / "checkpoints", config.model_dump(mode="json")
    state, last_saved = ckpt.start_or_resume(root, resume=resume, data_hash=data_hash, config=config_dict,
                                             model=inner, optimizer=optimizer, scheduler=scheduler, writer=group.main)
    group.barrier()  # the main process may have removed checkpoints after the one resumed
    log = logger or (RunLogger(run_dir, total_steps=total, start_step=state.step, config=config_dict) if group.main else SilentLogger())
    steps = StepLog(log, state, params, collapse_watch, group, fix="Lower train.lr, check the data for empty or broken "
                                                                   "examples, or resume from that checkpoint.")
    metric, mode = config.watched_metric(task)
    stopped = "completed"

    def save(is_best: bool = False) -> None:
        nonlocal last_saved
        steps.flush(last_saved)
        if steps.collapsed:  # a model that can no longer learn is not worth a checkpoint
            return
        gathered = ckpt.gather(inner, optimizer)  # every process: FSDP2 gathers its shards
        if group.main:
            last_saved = ckpt.save_checkpoint(root, model=inner, optimizer=optimizer, scheduler=scheduler, state=state,
                                              config=config_dict, keep_last_n=cfg.keep_last_n, is_best=is_best,
                                              gathered=gathered)
        group.barrier()
        last_saved = group.broadcast(last_saved)

    model.train()
    with guard.StopSignals() as interrupt, lost_processes(group, lambda: last_saved):
        try:
            while state.step < total:
                with autocast(precision, acc.device):
                    step = source.step(inner, epoch=state.epoch, index=state.index, step=state.step + 1, group=group)
                losses, norms, sums, lr = [], [], {}, scheduler.get_last_lr()[0]  # the rate the step starts with
                for u, batches in enumerate(step.updates):
                    weights = step.weights_of(batches)
                    counts = [objective.count(b) * w for b, w in zip(batches, weights)]  # on the host, before any forward
                    first = step.trained_tokens if step.trained_tokens is not None else sum(counts)
                    # This update's targets, and (once a step) its trained and seen tokens, over all processes.
                    n_step, trained, tokens = group.sum(torch.tensor(
                        [sum(counts), first if u == 0 else 0, step.tokens if u == 0 else 0], dtype=torch.float64)).tolist()
                    # Each process divides by the mean target count: DDP averages the processes' gradients.
                    loss, metrics = backward_step(model, objective, batches, n_step=n_step / group.world, accelerator=acc,
                                                  precision=precision, weights=weights)
                    # Measured even when not clipping (an infinite bound scales by 1): the guards read it.
                    norms.append(whole(acc.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)).detach().float())
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss)
                    state.trained_tokens += int(trained)
                    state.tokens += int(tokens)
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0) + v / len(step.updates)
                state.step, state.index = state.step + 1, state.index + step.examples
                if state.index >= len(source):
                    state.epoch, state.index = state.epoch + 1, 0
                # The last update's loss and norm stand for the step (a non-finite earlier one shows in the weights).
                steps.add(state.step, losses[-1], norms[-1], lr, {**step.metrics, **sums})
                for line in step.warnings:
                    log.print(f"[yellow]warning:[/yellow] {line}")
                    log.log({"step": state.step, "warning": line})
                if step.samples:
                    log.samples(state.step, step.samples)
                if state.step % cfg.log_every == 0:
                    steps.flush(last_saved)
                last = state.step == total
                evaluated = improved = False
                if validation is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                    steps.flush(last_saved)
                    with autocast(precision, acc.device):
                        result, samples = validation(inner, group)
                    if metric not in result:
                        raise TrainingError(f"train.early_stopping.metric={metric!r} is not computed; choose one of {sorted(result)}")
                    value, evaluated = result[metric], True
                    improved = state.best_metric is None or (value < state.best_metric if mode == "min" else value > state.best_metric)
                    if improved:
                        state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
                    else:
                        state.evals_since_best += 1
                    log.log({"step": state.step, "split": "validation", **result})
                    if samples:
                        log.samples(state.step, samples)
                    es = cfg.early_stopping
                    if es.patience and state.evals_since_best >= es.patience and not last:
                        stopped = "early_stopped"  # at the last step the run simply completed
                # Every process stops at the same step, whichever one the signal reached first.
                if group.sum(torch.tensor([1.0 if interrupt.requested else 0.0])).item() > 0:
                    stopped = "interrupted"
                periodic = cfg.save_every and state.step % cfg.save_every == 0
                if periodic or last or stopped != "completed" or (evaluated and (improved or not cfg.save_every)):
                    save(is_best=improved)
                    steps.restart_clock()  # tokens/s measures training: evaluation and saving are not in it
                elif evaluated:
                    steps.restart_clock()
                if steps.collapsed:  # seen at a log step or by the flush before a save, which then saved nothing
                    stopped = "collapsed"
                if stopped != "completed":
                    break
            steps.flush(last_saved)
            if steps.collapsed:
                stopped = "collapsed"
                log.log({"step": state.step, "collapsed": steps.collapsed})
                log.print(f"[red]collapsed:[/red] {steps.collapsed}")
        finally:
            if logger is None:
                log.close()
    if stopped == "interrupted":
        log.print(f"interrupted ({interrupt.requested or 'another process'}): saved {last_saved}")  # the caller prints how to resume
    reason = {"interrupted": interrupt.requested or "", "collapsed": steps.collapsed}.get(stopped, "")
    return FitResult(state, stopped, last_saved, ckpt.best_checkpoint(root), precision, time.time() - t0, reason)
