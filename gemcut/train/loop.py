"""The one training loop: `fit(...)`, used by every objective.

    python -m pytest -q tests/test_loop.py

accelerate underneath (so `accelerate launch` runs the same function under DDP), AdamW over the trainable
parameters only, warmup + cosine/linear/constant schedule, gradient clipping, and gradient accumulation in
which each micro-batch's summed loss is divided by the target count of the *whole* optimizer step, so that
batch 8 x 1 and batch 1 x 8 with accumulation give the same update. The data order of epoch e is a
permutation drawn from (seed, e) — with length grouping, batches of similar lengths — so the data position is
(epoch, index) and resume skips exactly to it. Losses, gradient norms and the largest trainable weight after
each update stay on the device until a log step or a save, where they are checked (`gemcut/train/guard.py`):
a NaN or inf stops the run naming the step and the last good checkpoint (a checkpoint is written only after
that check, so none holds a poisoned update), and a model stuck at the loss of a uniform guess with no
gradient stops it as "collapsed". Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and returns.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from gemcut.config import RunConfig
from gemcut.errors import TrainingError
from gemcut.models.padding_free import runs_padding_free
from gemcut.objectives.base import Objective
from gemcut.train import checkpoint as ckpt
from gemcut.train import guard
from gemcut.train.logging import RunLogger
from gemcut.train.optimizer import adamw, param_groups
from gemcut.train.schedule import build_scheduler, warmup_steps_for

Batch = dict[str, torch.Tensor]
GROUP_BATCHES = 50  # length grouping sorts windows of this many batches, like HF's megabatches


@dataclass
class FitResult:
    state: ckpt.TrainState
    stopped: str  # "completed", "early_stopped", "interrupted" or "collapsed"
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    precision: str
    seconds: float
    reason: str = ""  # interrupted: the signal ("SIGINT", "SIGTERM"); collapsed: what happened and the fix


def example_length(example: dict) -> int:
    """Tokens in an example: `input_ids`, or both sides of a preference pair (`chosen_input_ids`, ...)."""
    return sum(len(v) for k, v in example.items() if k.endswith("input_ids"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 where the hardware computes it natively (AVX-512 BF16 / AMX on CPU), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def epoch_order(lengths: Sequence[int], *, seed: int, epoch: int, batch_size: int, group_by_length: bool) -> list[int]:
    """Example indices in the order epoch `epoch` visits them; consecutive `batch_size` slices are batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length:
        return order
    window = batch_size * GROUP_BATCHES  # longest first inside each window, then batches shuffled
    order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


def group_by_length(setting: bool | str, model: torch.nn.Module) -> bool:
    """`train.group_by_length` resolved for `model`: "auto" groups batches by length unless the model runs
    padding-free, which pays for padding only inside attention and so keeps uniformly random batches (a
    length-grouped batch holds examples of one length, and its gradient is not that of a random sample)."""
    return not runs_padding_free(model) if setting == "auto" else bool(setting)


def macro_f1_from_confusion(flat_counts: torch.Tensor) -> float:
    """Macro-F1 over the classes that occur in the truth or the predictions of a flattened [C*C] confusion count
    (row = true class), the same set scikit-learn's f1_score(average="macro") averages over by default."""
    n_classes = int(round(flat_counts.numel() ** 0.5))
    m = flat_counts.reshape(n_classes, n_classes).double().cpu()
    tp, true, pred = m.diagonal(), m.sum(1), m.sum(0)
    present = (true + pred) > 0
    f1 = 2 * tp / (true + pred).clamp(min=1)
    return float(f1[present].mean()) if present.any() else 0.0


def evaluate(model, objective: Objective, examples: Sequence[dict], collate, *, batch_size: int, accelerator) -> dict[str, float]:
    """Mean loss over all validation targets; accuracy when the objective counts `correct`, macro-F1 when it
    counts a `confusion` matrix."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))  # less padding
    loss, n, sums = torch.zeros((), device=accelerator.device), 0, {}
    with torch.no_grad(), accelerator.autocast():
        for s in range(0, len(order), batch_size):
            batch = {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in order[s:s + batch_size]]).items()}
            out = objective(model, batch)
            loss += out.loss_sum.float()
            n += out.n_targets
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + v
    result = {"val_loss": loss.item() / max(n, 1), "val_targets": n}
    confusion = sums.pop("confusion", None)
    if confusion is not None:
        result["val_macro_f1"] = macro_f1_from_confusion(confusion)
    for k, v in sums.items():  # metric sums become means over the targets; `correct` is accuracy
        result["val_accuracy" if k == "correct" else f"val_{k}"] = float(v) / max(n, 1)
    model.train()
    return result


def backward_step(model, objective: Objective, batches: Sequence[Batch], *, n_step: float, accelerator) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step; returns the step's loss (mean over its `n_step` targets).

    Every micro-batch's summed loss is divided by the step's total target count before its backward, so the
    accumulated gradient is that of the mean over all the step's targets, however they are split."""
    step_loss = torch.zeros((), device=accelerator.device)
    for k, batch in enumerate(batches):
        batch = {key: v.to(accelerator.device, non_blocking=True) for key, v in batch.items()}
        # DDP: all-reduce the gradients once, after the last micro-batch
        sync = contextlib.nullcontext() if k == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                out = objective(model, batch)
            loss = out.loss_sum / max(n_step, 1)
            accelerator.backward(loss)
        step_loss += loss.detach()
    return step_loss


def store_frozen_linears_in_bf16(model: torch.nn.Module) -> int:
    """Under bf16 autocast, keep the frozen weights of a LoRA model's linear layers in bf16; returns how many.

    Autocast casts every Linear's weight and bias to bf16 at every forward, so storing the frozen ones in
    bf16 once gives bit-identical results, without re-casting the base model each step, in half the memory.
    Only for peft models, whose final save holds the adapter alone; a weight tied to an embedding (a tied LM
    head) stays as it is, because the embedding's output is not autocast."""
    if not hasattr(model, "peft_config") or any(getattr(c, "use_dora", False) for c in model.peft_config.values()):
        return 0  # DoRA reads the base weight in its own (non-autocast) arithmetic
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and id(module.weight) not in tied \
                and module.weight.dtype == torch.float32:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            n += 1
    return n


def _accelerator(precision: str) -> Accelerator:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()  # single process: let each fit pick its own precision
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if precision == "bf16" else "no")


def fit(model: torch.nn.Module, objective: Objective, train_set: Sequence[dict], collate: Callable[[list[dict]], Batch], *,
        config: RunConfig, run_dir: Path, val_set: Sequence[dict] | None = None, data_hash: str = "", resume: bool = False,
        sample_fn: Callable[[torch.nn.Module], list[dict]] | None = None, logger: RunLogger | None = None) -> FitResult:
    """Train `model` in place on tokenized `train_set` (dicts with `input_ids`, ...) batched by `collate`.

    Writes `run_dir/metrics.jsonl`, `samples.jsonl`, `tb/` and `checkpoints/`. With `resume` (True, or a
    checkpoint's name `step-N`), continues from the newest complete checkpoint, or that one, after checking
    that it is intact and made from this data and config. `sample_fn(model)` returns
    generated samples ([{"prompt", "output"}]) written at each evaluation. Under bf16 the frozen linear
    weights of a LoRA model stay in bf16 afterwards (see `store_frozen_linears_in_bf16`): call the model
    through its forward (accelerate keeps it autocast) or inside `torch.autocast`."""
    cfg, t0 = config.train, time.time()
    set_seed(cfg.seed)
    acc = _accelerator(resolve_precision(cfg.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    precision = "bf16" if acc.mixed_precision == "bf16" else "fp32"
    if precision == "bf16":
        store_frozen_linears_in_bf16(model)
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_lr_decay)
    if not groups:
        raise TrainingError("no trainable parameters: check adapter.method and adapter.target_modules")
    params = [p for g in groups for p in g["params"]]
    optimizer = adamw(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    choices = guard.uniform_choices(model, getattr(objective, "task", None))
    collapse_watch = guard.CollapseWatch(choices, cfg.lr) if choices else None
    model, optimizer = acc.prepare(model, optimizer)
    world, per_micro = acc.num_processes, cfg.batch_size
    per_step = per_micro * cfg.grad_accum * world
    steps_per_epoch = math.ceil(len(train_set) / per_step)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, total_steps=total, kind=cfg.schedule,
                                warmup=warmup_steps_for(total, cfg.warmup_steps, cfg.warmup_ratio))
    root, config_dict = Path(run_dir) / "checkpoints", config.model_dump(mode="json")
    state, last_saved = ckpt.start_or_resume(root, resume=resume, data_hash=data_hash, config=config_dict,
                                             model=acc.unwrap_model(model), optimizer=optimizer, scheduler=scheduler)
    log = logger or RunLogger(run_dir, total_steps=total, start_step=state.step, config=config_dict)
    lengths = [example_length(ex) for ex in train_set]
    grouped = group_by_length(cfg.group_by_length, model)
    es, orders, pending = cfg.early_stopping, {}, []
    stopped, t_log, tokens_log = "completed", time.time(), (state.tokens, state.trained_tokens)
    collapsed = ""  # the collapse message, once the watch has seen one

    def flush() -> None:
        """Sync the values kept on the device since the last flush: stop on NaN/inf, watch for a collapse, log."""
        nonlocal t_log, tokens_log, collapsed
        if not pending:
            return
        values = torch.stack([torch.stack([l_, g_, w_]) for _, l_, g_, w_, _ in pending]).float().tolist()
        for (step, *_), (loss, gnorm, weights) in zip(pending, values):
            guard.check_finite(step, loss=loss, grad_norm=gnorm, weights=weights, params=params, now=state.step,
                               last_good=last_saved, fix="Lower train.lr, check the data for empty or broken examples, "
                                                         "or resume from that checkpoint.")
            if collapse_watch is not None and not collapsed:
                collapsed = collapse_watch.update(step, loss, gnorm) or ""
        now, seconds = time.time(), max(time.time() - t_log, 1e-9)
        tokens, trained = state.tokens - tokens_log[0], state.trained_tokens - tokens_log[1]
        log.log({"step": pending[-1][0], "epoch": state.epoch, "loss": sum(v[0] for v in values) / len(values),
                 "lr": pending[-1][4], "grad_norm": values[-1][1], "tokens": tokens, "trained_tokens": trained,
                 "tokens_per_s": tokens / seconds, "trained_tokens_per_s": trained / seconds,
                 "tokens_total": state.tokens, "trained_tokens_total": state.trained_tokens})
        t_log, tokens_log = now, (state.tokens, state.trained_tokens)
        pending.clear()

    def save(is_best: bool = False) -> None:
        nonlocal last_saved
        flush()
        if collapsed:  # a model that can no longer learn is not worth a checkpoint
            return
        last_saved = ckpt.save_checkpoint(root, model=acc.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                                          state=state, config=config_dict, keep_last_n=cfg.keep_last_n, is_best=is_best)

    model.train()
    with guard.StopSignals() as interrupt:
        try:
            while state.step < total:
                if state.epoch not in orders:
                    orders = {state.epoch: epoch_order(lengths, seed=cfg.seed, epoch=state.epoch, batch_size=per_micro,
                                                       group_by_length=grouped)}
                take = orders[state.epoch][state.index:state.index + per_step]
                micro = [take[s:s + per_micro] for s in range(0, len(take), per_micro)][acc.process_index::world]
                batches = [collate([train_set[i] for i in ids]) for ids in micro]
                counts = [objective.count(b) for b in batches]  # on the host, before any forward
                state.tokens += sum(lengths[i] for ids in micro for i in ids)  # real tokens, padding excluded
                n_step = sum(counts)
                if world > 1:  # normalise by the targets of the step on all processes; DDP averages the grads
                    n_step = int(acc.reduce(torch.tensor(n_step, device=acc.device), "sum")) / world
                step_loss = backward_step(model, objective, batches, n_step=n_step, accelerator=acc)
                state.trained_tokens += sum(counts)
                # Measured even when not clipping (an infinite bound scales by 1): the guards read it.
                gnorm = acc.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step, state.index = state.step + 1, state.index + len(take)
                if state.index >= len(train_set):
                    state.epoch, state.index = state.epoch + 1, 0
                pending.append((state.step, step_loss, gnorm.detach().float(), guard.weights_max_abs(params), lr))
                if state.step % cfg.log_every == 0:
                    flush()
                last = state.step == total
                evaluated = improved = False
                if val_set and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                    flush()
                    result = evaluate(model, objective, val_set, collate, batch_size=per_micro, accelerator=acc)
                    if es.metric not in result:
                        raise TrainingError(f"train.early_stopping.metric={es.metric!r} is not computed; choose one of {sorted(result)}")
                    value, evaluated = result[es.metric], True
                    improved = state.best_metric is None or (value < state.best_metric if es.mode == "min" else value > state.best_metric)
                    if improved:
                        state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
                    else:
                        state.evals_since_best += 1
                    log.log({"step": state.step, "split": "validation", **result})
                    if sample_fn is not None:
                        log.samples(state.step, sample_fn(acc.unwrap_model(model)))
                        model.train()
                    if es.patience and state.evals_since_best >= es.patience and not last:
                        stopped = "early_stopped"  # at the last step the run simply completed
                if interrupt.requested:
                    stopped = "interrupted"
                periodic = cfg.save_every and state.step % cfg.save_every == 0
                saving = periodic or last or stopped != "completed" or (evaluated and (improved or not cfg.save_every))
                if saving:
                    save(is_best=improved)
                if saving or evaluated:
                    t_log = time.time()  # tokens/s measures training: evaluation and saving are not in it
                if collapsed:  # seen at a log step or by the flush before a save, which then saved nothing
                    stopped = "collapsed"
                if stopped != "completed":
                    break
            flush()
            if collapsed:
                stopped = "collapsed"
                log.log({"step": state.step, "collapsed": collapsed})
                log.print(f"[red]collapsed:[/red] {collapsed}")
        finally:
            if logger is None:
                log.close()
    if stopped == "interrupted":
        log.print(f"interrupted ({interrupt.requested}): saved {last_saved}")  # the caller prints how to resume
    reason = {"interrupted": interrupt.requested or "", "collapsed": collapsed}.get(stopped, "")
    return FitResult(state, stopped, last_saved, ckpt.best_checkpoint(root), precision, time.time() - t0, reason)
