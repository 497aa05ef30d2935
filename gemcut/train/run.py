"""A whole training run: prepare -> load -> adapt -> tokenize -> fit -> save, into `runs/<name>/`.

    gemcut train examples/sft_chatterbot.yaml train.max_steps=20
    python -c "from gemcut import load_config, run_training; run_training(load_config('examples/sft_chatterbot.yaml'))"

`train(config, resume=False) -> Path` (`gemcut.run_training` at the package root) is the Python entry point;
`train_run` is the same run, returning how it ended too (the CLI's exit status). The task is resolved once,
from the task table (gemcut/tasks.py), and everything below reads its row. The run folder gets: `config.yaml`
(resolved), `data/` (cleaned splits), `data_report.json` (cleaning and tokenization counts), `gemcut_run.json`
(what `load_run` needs for checkpoints), `metrics.jsonl`, `samples.jsonl`, `tb/`, `checkpoints/`, `final/`
(adapter or model, tokenizer, template, labels; PPO's value head) and `manifest.json` (package versions, data
and config hashes, file hashes of `final/`, the speed-ups applied, how the run ended).

With `resume`, nothing is written into the run folder until the checkpoint is shown intact and made from
this data and config: a refused resume leaves the folder describing the run that happened. A run that
collapses (gemcut/train/guard.py) gets a manifest saying so, no `final/`, and a TrainingError.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shlex
import time
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console

from gemcut.config import RunConfig
from gemcut.errors import TrainingError
from gemcut.run_folder import best_checkpoint, latest_checkpoint, load_trainable
from gemcut.tasks import Task, resolve_task
from gemcut.train.checkpoint import check_compatible, resume_point

PACKAGES = ("gemcut", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "trl")


@dataclass
class TrainOutcome:
    run_dir: Path
    stopped: str  # "completed", "early_stopped" or "interrupted" (a collapse raises)
    reason: str = ""  # interrupted: the signal, "SIGINT" or "SIGTERM"
    main: bool = True  # the process that wrote the run folder (the others of a run on several return too)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-").lower() or "model"


def run_folder(config: RunConfig, task: Task, *, resume: bool) -> Path:
    """`output.dir/output.name`; without a name, `<model>-<task>-<time>` (or, to resume, the newest such)."""
    root = Path(config.output.dir)
    if config.output.name:
        return root / config.output.name
    prefix = f"{_slug(config.model.name)}-{task.name}-"
    if resume:
        found = sorted((p for p in root.glob(prefix + "*") if latest_checkpoint(p / "checkpoints")), key=lambda p: p.name)
        if not found:
            raise TrainingError(f"--resume: no run folder {root}/{prefix}* with a checkpoint; pass output.name=<run folder name>")
        return found[-1]
    return root / (prefix + time.strftime("%Y%m%d-%H%M%S"))


def _check_estimate(config: RunConfig, model, task: str, examples: list[dict], say) -> dict | None:
    """Refuse a run the estimate says will not fit in memory, unless train.force.

    It sizes the model already loaded, without a probe: training needs only the memory verdict (the measured
    probe, which times a few steps, is what `gemcut estimate` is for)."""
    from gemcut.train.estimate import estimate_model

    est = estimate_model(config, model, task, examples=examples)
    if not est.fits and not config.train.force:
        raise TrainingError(f"the estimate predicts this run will not fit in memory: {est}\n"
                            "Lower train.batch_size or data.max_length, use adapter.method=lora, or set train.force=true to start anyway.")
    say(f"estimate: {est}" if est.fits else f"estimate: will not fit, starting anyway (train.force): {est}")
    return est.to_dict()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def train(config: RunConfig, *, resume: bool | str = False) -> Path:
    """Run `config` end to end and return the run folder (see the module docstring). `resume`: True continues
    from the newest complete checkpoint, "step-N" from that one."""
    return train_run(config, resume=resume).run_dir


def resume_command(command: list[str] | None, run_name: str) -> str:
    """The command that continues this run: `command` (the `gemcut train CONFIG k=v ...` that started it) with
    the run's name pinned and --resume; without it, the command's shape with CONFIG to fill in."""
    if command is None:
        return f"gemcut train CONFIG output.name={run_name} --resume (CONFIG: the run file it started from)"
    kept = [arg for arg in command if not arg.startswith("output.name=")]
    return shlex.join([*kept, f"output.name={run_name}", "--resume"])


def _template(task: Task, kind: str, config: RunConfig, tokenizer):
    """The chat template the run renders its records with (or keeps for chatting later): the task table says
    when one is needed (gemcut/tasks.py, `Task.chat_template`)."""
    from gemcut.data.templates import ChatTemplate

    use = task.chat_template(kind, bool(config.data.template))
    if use == "required" or (use == "if_any" and getattr(tokenizer, "chat_template", None)):
        return ChatTemplate.from_tokenizer(tokenizer, config.data.template, config.data.system_prompt)
    return None


def _enable_activation_checkpointing(model, config: RunConfig, task: str, say) -> str:
    """Apply the activation plan train.activation_checkpointing asks for (auto: the one the estimate picks within
    train.memory_budget_gb; gemcut/train/estimate.py) and return it: "none", "selective" or "full"."""
    from gemcut.models.fast.recompute import apply_plan
    from gemcut.train.estimate import choose_activation_plan

    plan, why = choose_activation_plan(config, model, task)
    apply_plan(model, plan)
    if config.train.activation_checkpointing is not False:
        say(f"activation checkpointing: {plan} ({why})")
    return plan


def train_run(config: RunConfig, *, resume: bool | str = False, command: list[str] | None = None) -> TrainOutcome:
    """`train`, returning how the run ended as well as where. `command` is how the run was started (for the
    resume hint an interruption prints)."""
    from accelerate.utils import set_seed

    from gemcut.data.prepare import prepare
    from gemcut.data.tokenize import resolve_label_names, tokenize_records
    from gemcut.models.adapters import apply_adapter, trainable_summary
    from gemcut.models.fast import apply_fast
    from gemcut.models.load import load_base, save_final
    from gemcut.models.pooling import classifier_pooling
    from gemcut.objectives import build_objective
    from gemcut.run_folder import run_meta, write_run_meta
    from gemcut.train.batches import ExampleSource, collator_for, resolve_group_by_length
    from gemcut.train.distributed import launch_plan, lost_processes, micro_batch_size, sharded, start, strategy_name
    from gemcut.train.loop import fit
    from gemcut.train.paraphrase import model_paraphraser
    from gemcut.train.samples import sample_fn
    from gemcut.train.validation import LossValidation

    t0 = time.time()
    cfg = config.train
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not torch.cuda.is_available():
        from gemcut.train.allocator import keep_freed_memory

        keep_freed_memory()  # each step's large tensors reuse warm pages instead of faulting fresh ones in
    group = start(cfg)  # the processes of the run (one, unless launched by torchrun or accelerate launch)
    main = group.main  # the one process that writes the run folder
    # The main process names the folder (a name with the time in it must be the same on every process).
    run_dir = group.broadcast(run_folder(config, resolve_task(config.objective.kind, config.data.kind), resume=bool(resume)))
    if not resume and latest_checkpoint(run_dir / "checkpoints") is not None:
        raise TrainingError(f"{run_dir} already holds checkpoints; continue it with --resume, or choose another output.name")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    console = partial(Console(stderr=True).print, highlight=False, soft_wrap=True, markup=False)  # paths and commands hold [ ]
    say = console if main else (lambda *a, **k: None)
    say(f"run folder: {run_dir}")
    say(launch_plan(cfg, group))

    # Resuming, the data is prepared outside the run folder and the checkpoint checked before anything is written.
    # Every process prepares the same data (the split is seeded); the main one writes it.
    paraphrase = model_paraphraser(config.data.augment)  # data.augment.paraphrase's model, loaded when first asked
    prepared = prepare(config.data, None if resume or not main else run_dir / "data", paraphrase=paraphrase)
    if resume:
        check_compatible(resume_point(run_dir / "checkpoints", resume), data_hash=prepared.content_hash,
                         config=config.model_dump(mode="json"))
        if main and not (run_dir / "data" / "content_hash.txt").is_file():  # data/ lost since: the same data, written again
            prepared = prepare(config.data, run_dir / "data", paraphrase=paraphrase)
    if main:
        (run_dir / "config.yaml").write_text(config.to_yaml())
    kind = prepared.kind
    task = resolve_task(config.objective.kind, kind)  # the one place a run's task is decided
    set_seed(cfg.seed)  # before load_base: a new classification head is drawn from the global RNG
    labels = None
    if kind == "label":  # the declared set, or the sorted labels seen in training (stable ids)
        labels = list(prepared.labels or resolve_label_names(list(prepared.splits["train"]), config.data.labels))
    head_labels = labels if task.head == "classifier" else None
    model, tokenizer = load_base(config.model, task.name, num_labels=len(head_labels) if head_labels else None,
                                 label_names=head_labels, quantization=config.adapter.base_quantization())
    model = apply_adapter(model, config.adapter, task.name)
    fast = apply_fast(model, task, cfg)
    checkpointing = _enable_activation_checkpointing(model, config, task.name, say)
    say(trainable_summary(model, config.adapter))
    grouped = resolve_group_by_length(cfg.group_by_length, "padding_free" in fast)
    if fast:
        say(f"speed-ups (train.fast): {', '.join(fast)}" + ("" if task.rollouts else
            f"; {'length-grouped' if grouped else 'uniformly random'} batches (train.group_by_length)"))
    pooling = classifier_pooling(model)
    if pooling is not None:
        say(f"classifier pooling: {'the mean of the tokens' if pooling == 'mean' else 'the first token'} "
            f"(model.pooling={config.model.pooling})")
    template = _template(task, kind, config, tokenizer)

    train_records = prepared.splits["train"]
    val_records = list(prepared.splits.get("validation") or [])
    val_left_out = max(0, len(val_records) - (cfg.val_max_examples or len(val_records)))
    if val_left_out:  # validation during training scores a fixed subset; `gemcut eval` scores whole splits
        say(f"validation during training: the first {cfg.val_max_examples} of {len(val_records)} records (train.val_max_examples)")
        val_records = val_records[:cfg.val_max_examples]
    if task.rollouts:  # RL samples its own completions: records are prompts, tokenized by gemcut.train.rollouts
        note = "RL prompts: tokenized by gemcut.train.rollouts.prompt_inputs (objective.rl.prompt_words)"
        train_ex, train_stats = list(train_records), {"kind": kind, "task": task.name, "examples": len(train_records), "note": note}
        val_ex, val_stats = val_records, {"kind": kind, "task": task.name, "examples": len(val_records), "note": note}
    else:
        train_ex, train_stats = tokenize_records(train_records, kind, tokenizer, template, config.data, task, labels)
        val_ex, val_stats = tokenize_records(val_records, kind, tokenizer, template, config.data, task, labels) if val_records else ([], {})
    if not train_ex:
        raise TrainingError(f"no training examples left after tokenization: {train_stats.get('dropped')}; see {run_dir / 'data_report.json'}")
    labels = train_stats.get("label_names", labels)
    val_stats = {**val_stats, "left_out_by_val_max_examples": val_left_out}
    report = {**(prepared.report or {}), "tokenization": {"train": train_stats, "validation": val_stats}}
    if main:
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=2, default=str))
        write_run_meta(run_dir, run_meta(config, task.name, labels))
        if template is not None:
            template.save(run_dir)
    say(f"{task.name} on {len(train_ex)} training and {len(val_ex)} validation examples ({kind} records)")
    estimate_info = _check_estimate(config, model, task.name, None if task.rollouts else train_ex, say)

    objective = build_objective(task, config, labels=labels, train_examples=train_ex)
    fsdp2 = sharded(cfg, group)
    if fsdp2 and task.rollouts:  # sampling runs a different number of forwards on each process
        raise TrainingError(f"objective.kind={task.name} samples from the policy on every process, which a sharded "
                            "model cannot do in step; use train.distributed.strategy=ddp (RL trains a LoRA adapter)")
    if task.rollouts:
        source, validation, trained = _rollouts(task, config, model, tokenizer, template, train_records, val_records)
    else:
        collate = collator_for(task, tokenizer.pad_token_id)
        source = ExampleSource(train_ex, collate, cfg, group_by_length=grouped, mixture=config.data.mixture)
        # Samples are generated on the main process alone, which a sharded model cannot do.
        samples = sample_fn(config, kind, val_records, tokenizer, template, labels) if task.samples and not fsdp2 else None
        validation = LossValidation(objective, val_ex, collate, batch_size=micro_batch_size(cfg, group.world),
                                    sample_fn=samples) if val_ex else None
        trained = model
    with lost_processes(group, lambda: latest_checkpoint(run_dir / "checkpoints")):
        result = fit(trained, objective, source, config=config, task=task, run_dir=run_dir, validation=validation,
                     data_hash=prepared.content_hash, resume=resume, group=group)
    stopped, reason, state = result.stopped, result.reason, result.state
    if stopped == "interrupted":
        say(f"stopped by {reason} after step {state.step}; saved {result.last_checkpoint}; "
            f"continue with: {resume_command(command, run_dir.name)}")
        return TrainOutcome(run_dir, stopped, reason, main)

    final, final_from = None, None
    if not main:  # the main process saves final/ and the manifest
        group.barrier()
        if stopped == "collapsed":
            raise TrainingError(reason)
        return TrainOutcome(run_dir, stopped, reason, main)
    if stopped != "collapsed":  # a collapsed model is not worth a final/: nothing should load it as finished
        final_from = "last"
        best = best_checkpoint(run_dir / "checkpoints")
        if cfg.early_stopping.patience and best is not None:
            final_from = best.name
        if fsdp2:  # the trained model is in shards: final/ is the whole model, from the checkpoint's whole weights
            model = _unsharded(run_dir, final_from)
        elif final_from != "last":
            load_trainable(trained, best)  # early stopping keeps the best weights, not the last
        meta = {**run_meta(config, task.name, labels), "final_from": final_from}
        final = save_final(model, tokenizer, template, run_dir / "final", labels=labels, meta=meta)
        if task.value_head:  # PPO: the value head goes with the policy
            from gemcut.models.value_head import save_value_head

            save_value_head(trained.value_head, final)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - t0, 1),
        "loop_seconds": round(result.seconds, 1), "task": task.name, "record_kind": kind, "stopped": stopped,
        "reason": reason, "final_from": final_from, "steps": state.step, "tokens": state.tokens,
        "trained_tokens": state.trained_tokens, "best_step": state.best_step, "best_metric": state.best_metric,
        "watched_metric": config.watched_metric(task)[0], "precision": result.precision, "seed": cfg.seed, "fast": fast,
        "activation_checkpointing": checkpointing,
        "processes": group.world, "strategy": strategy_name(cfg, group),
        "padding_free": "padding_free" in fast, "pooling": pooling, "versions": _versions(), "data_hash": prepared.content_hash,
        "config_sha256": hashlib.sha256(config.to_yaml().encode()).hexdigest(), "estimate": estimate_info,
        "final_files": {str(p.relative_to(final)): _sha256(p) for p in sorted(final.rglob("*")) if p.is_file()} if final else {},
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    group.barrier()
    if stopped == "collapsed":
        raise TrainingError(reason)
    say(f"done: {stopped} after {state.step} steps; model in {final}")
    return TrainOutcome(run_dir, stopped, reason)


def _unsharded(run_dir: Path, checkpoint: str):
    """The run's model rebuilt whole on this process (base + adapter, as `load_run` does for a checkpoint) with
    the gathered weights of `checkpoint` ("last" or "step-N"): what final/ saves after an FSDP2 run."""
    from gemcut.models.load import load_run

    return load_run(run_dir, checkpoint).model


def _rollouts(task: Task, config: RunConfig, policy, tokenizer, template, train_records, val_records):
    """GRPO's and PPO's batch source, validation and trained module, with the reward the config names."""
    from gemcut.objectives.reward_functions import load_reward
    from gemcut.train.rollouts import prompt_inputs, rl_training

    words = config.objective.rl.prompt_words
    val_prompts = prompt_inputs(val_records, tokenizer, template, words) if val_records else None
    return rl_training(task, config, policy, tokenizer, prompt_inputs(train_records, tokenizer, template, words),
                       load_reward(config.objective.rl, max_length=config.data.max_length), val_prompts)
