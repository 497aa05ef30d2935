"""A whole training run: prepare -> load -> adapt -> tokenize -> fit -> save, into `runs/<name>/`.

    gemcut train examples/sft_chatterbot.yaml train.max_steps=20
    python -c "from gemcut import load_config, train; train(load_config('examples/sft_chatterbot.yaml'))"

`train(config, resume=False) -> Path` is the Python entry point the job worker and the benchmark call;
`train_run` is the same run, returning how it ended too (the CLI's exit status). The run folder gets: `config.yaml` (resolved), `data/` (cleaned splits), `data_report.json` (cleaning
and tokenization counts), `gemcut_run.json` (what `load_run` needs for checkpoints), `metrics.jsonl`,
`samples.jsonl`, `tb/`, `checkpoints/`, `final/` (adapter or model, tokenizer, template, labels) and
`manifest.json` (package versions, data and config hashes, file hashes of `final/`, how the run ended).

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
from gemcut.train.checkpoint import best_checkpoint, check_compatible, latest_checkpoint, load_trainable, resume_point

PACKAGES = ("gemcut", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "trl")
SAMPLE_MAX_NEW_TOKENS = 48


@dataclass
class TrainOutcome:
    run_dir: Path
    stopped: str  # "completed", "early_stopped" or "interrupted" (a collapse raises)
    reason: str = ""  # interrupted: the signal, "SIGINT" or "SIGTERM"


def resolve_task(objective_kind: str, record_kind: str) -> str:
    """objective.kind, or what the records imply: label -> classify, preference -> dpo, else causal_lm."""
    if objective_kind != "auto":
        return objective_kind
    return {"label": "classify", "preference": "dpo"}.get(record_kind, "causal_lm")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-").lower() or "model"


def run_folder(config: RunConfig, task: str, *, resume: bool) -> Path:
    """`output.dir/output.name`; without a name, `<model>-<task>-<time>` (or, to resume, the newest such)."""
    root = Path(config.output.dir)
    if config.output.name:
        return root / config.output.name
    prefix = f"{_slug(config.model.name)}-{task}-"
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
    from gemcut.models.estimate import estimate_model

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


def _sample_fn(config: RunConfig, kind: str, records: list[dict], tokenizer, template, labels):
    """SFT: greedy completions of the first few validation prompts, for samples.jsonl at each evaluation."""
    if kind not in ("messages", "prompt_completion") or not config.train.sample_prompts or not records:
        return None
    from gemcut.data.tokenize import conversation
    from gemcut.generation import generate_messages

    prompts = []
    for record in records[: config.train.sample_prompts]:
        messages = conversation(record, kind, config.data, labels)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append((messages[:last], messages[last]["content"]))

    def sample(model) -> list[dict]:
        model.eval()
        with torch.no_grad():
            outs = generate_messages(model, tokenizer, template, [p for p, _ in prompts],
                                     max_new_tokens=min(config.eval.max_new_tokens, SAMPLE_MAX_NEW_TOKENS))
        return [{"prompt": p[-1]["content"], "reference": ref, "output": o.text} for (p, ref), o in zip(prompts, outs)]

    return sample


def _objective_and_collate(task: str, config: RunConfig, pad_id: int, train_examples: list[dict], labels):
    from gemcut.data import collate as C
    from gemcut.objectives import balanced_class_weights, build_objective

    if task == "classify":
        weights = config.objective.class_weights
        if weights == "balanced":
            weights = balanced_class_weights([ex["label"] for ex in train_examples], len(labels))
        elif weights == "none":
            weights = None
        elif len(weights) != len(labels):
            raise TrainingError(f"objective.class_weights has {len(weights)} values for {len(labels)} labels ({', '.join(labels)})")
        return build_objective("classify", weights), partial(C.collate_classify, pad_id=pad_id)
    if task == "dpo":
        from gemcut.objectives.dpo import DPO

        return DPO(config.objective.dpo.beta), partial(C.collate_preference, pad_id=pad_id)
    if task == "reward":
        from gemcut.objectives.reward import PairwiseReward

        return PairwiseReward(), partial(C.collate_preference, pad_id=pad_id)
    return build_objective(task), partial(C.collate_causal, pad_id=pad_id)


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


def train_run(config: RunConfig, *, resume: bool | str = False, command: list[str] | None = None) -> TrainOutcome:
    """`train`, returning how the run ended as well as where. `command` is how the run was started (for the
    resume hint an interruption prints)."""
    from accelerate.utils import set_seed

    from gemcut.data.prepare import prepare
    from gemcut.data.templates import ChatTemplate
    from gemcut.data.tokenize import resolve_label_names, tokenize_records
    from gemcut.models.adapters import apply_adapter, trainable_summary
    from gemcut.models.load import load_base, run_meta, save_final, write_run_meta
    from gemcut.models.padding_free import runs_padding_free
    from gemcut.models.pooling import classifier_pooling
    from gemcut.train.loop import fit, group_by_length

    t0 = time.time()
    cfg = config.train
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not torch.cuda.is_available():
        from gemcut.train.allocator import keep_freed_memory

        keep_freed_memory()  # each step's large tensors reuse warm pages instead of faulting fresh ones in
    task_hint = resolve_task(config.objective.kind, config.data.kind)
    run_dir = run_folder(config, task_hint, resume=bool(resume))
    if not resume and latest_checkpoint(run_dir / "checkpoints") is not None:
        raise TrainingError(f"{run_dir} already holds checkpoints; continue it with --resume, or choose another output.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    say = partial(Console(stderr=True).print, highlight=False, soft_wrap=True, markup=False)  # paths and commands hold [ ]
    say(f"run folder: {run_dir}")

    # Resuming, the data is prepared outside the run folder and the checkpoint checked before anything is written.
    prepared = prepare(config.data, None if resume else run_dir / "data")
    if resume:
        check_compatible(resume_point(run_dir / "checkpoints", resume), data_hash=prepared.content_hash,
                         config=config.model_dump(mode="json"))
        if not (run_dir / "data" / "content_hash.txt").is_file():  # data/ lost since: the same data, written again
            prepared = prepare(config.data, run_dir / "data")
    (run_dir / "config.yaml").write_text(config.to_yaml())
    kind = prepared.kind
    task = resolve_task(config.objective.kind, kind)
    set_seed(cfg.seed)  # before load_base: a new classification head is drawn from the global RNG
    labels = None
    if kind == "label":  # the declared set, or the sorted labels seen in training (stable ids)
        labels = list(prepared.labels or resolve_label_names(list(prepared.splits["train"]), config.data.labels))
    head_labels = labels if task == "classify" else None
    model, tokenizer = load_base(config.model, task, num_labels=len(head_labels) if head_labels else None, label_names=head_labels)
    model = apply_adapter(model, config.adapter, task)
    if cfg.fast_dropout:
        from gemcut.models.fast_dropout import use_fast_dropout

        use_fast_dropout(model)  # the same keep probability per element, a cheaper draw (its docstring)
    if cfg.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", True):
            raise TrainingError(f"{config.model.name} does not support activation checkpointing; set train.activation_checkpointing=false")
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings under LoRA are fine.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    say(trainable_summary(model, config.adapter))
    padding_free = runs_padding_free(model)
    if padding_free:
        grouping = "length-grouped batches" if group_by_length(cfg.group_by_length, model) else "uniformly random batches"
        say(f"padding-free encoder: the linear layers see real tokens only; {grouping} (train.group_by_length)")
    pooling = classifier_pooling(model)
    if pooling is not None:
        say(f"classifier pooling: {'the mean of the tokens' if pooling == 'mean' else 'the first token'} "
            f"(model.pooling={config.model.pooling})")
    template = None
    if task != "classify":
        if kind != "text" or config.data.template:
            template = ChatTemplate.from_tokenizer(tokenizer, config.data.template, config.data.system_prompt)
        elif getattr(tokenizer, "chat_template", None):  # pretraining needs none; keep the model's for chatting later
            template = ChatTemplate.from_tokenizer(tokenizer, None, config.data.system_prompt)

    train_records = prepared.splits["train"]
    val_records = list(prepared.splits.get("validation") or [])
    val_left_out = max(0, len(val_records) - (cfg.val_max_examples or len(val_records)))
    if val_left_out:  # validation during training scores a fixed subset; `gemcut eval` scores whole splits
        say(f"validation during training: the first {cfg.val_max_examples} of {len(val_records)} records (train.val_max_examples)")
        val_records = val_records[:cfg.val_max_examples]
    if task in ("ppo", "grpo"):  # RL samples its own completions: records are prompts, tokenized by gemcut.train.rl
        note = "RL prompts: tokenized by gemcut.train.rl.prompt_inputs (objective.rl.prompt_words)"
        train_ex, train_stats = list(train_records), {"kind": kind, "task": task, "examples": len(train_records), "note": note}
        val_ex, val_stats = val_records, {"kind": kind, "task": task, "examples": len(val_records), "note": note}
    else:
        train_ex, train_stats = tokenize_records(train_records, kind, tokenizer, template, config.data, task, labels)
        val_ex, val_stats = tokenize_records(val_records, kind, tokenizer, template, config.data, task, labels) if val_records else ([], {})
    if not train_ex:
        raise TrainingError(f"no training examples left after tokenization: {train_stats.get('dropped')}; see {run_dir / 'data_report.json'}")
    labels = train_stats.get("label_names", labels)
    val_stats = {**val_stats, "left_out_by_val_max_examples": val_left_out}
    report = {**(prepared.report or {}), "tokenization": {"train": train_stats, "validation": val_stats}}
    (run_dir / "data_report.json").write_text(json.dumps(report, indent=2, default=str))
    write_run_meta(run_dir, run_meta(config, task, labels))
    if template is not None:
        template.save(run_dir)
    say(f"{task} on {len(train_ex)} training and {len(val_ex)} validation examples ({kind} records)")
    estimate_info = _check_estimate(config, model, task, None if task in ("ppo", "grpo") else train_ex, say)

    if task in ("ppo", "grpo"):
        from gemcut.objectives.rewards import load_reward
        from gemcut.train.rl import fit_rl, prompt_inputs

        words = config.objective.rl.prompt_words
        result = fit_rl(model, tokenizer, prompt_inputs(train_records, tokenizer, template, words),
                        load_reward(config.objective.rl, max_length=config.data.max_length), algo=task, config=config,
                        run_dir=run_dir, data_hash=prepared.content_hash, resume=resume,
                        val_prompts=prompt_inputs(val_records, tokenizer, template, words) if val_records else None)
    else:
        objective, collate = _objective_and_collate(task, config, tokenizer.pad_token_id, train_ex, labels)
        sample_fn = _sample_fn(config, kind, val_records, tokenizer, template, labels) if task == "causal_lm" else None
        result = fit(model, objective, train_ex, collate, config=config, run_dir=run_dir, val_set=val_ex or None,
                     data_hash=prepared.content_hash, resume=resume, sample_fn=sample_fn)
    stopped, reason = result.stopped, result.reason
    if stopped == "interrupted":
        say(f"stopped by {reason} after step {result.state.step}; saved {result.last_checkpoint}; "
            f"continue with: {resume_command(command, run_dir.name)}")
        return TrainOutcome(run_dir, stopped, reason)

    final, final_from = None, None
    if stopped != "collapsed":  # a collapsed model is not worth a final/: nothing should load it as finished
        final_from = "last"
        best = best_checkpoint(run_dir / "checkpoints")
        if cfg.early_stopping.patience and best is not None:
            load_trainable(model, best)  # early stopping keeps the best weights, not the last
            final_from = best.name
        meta = {**run_meta(config, task, labels), "final_from": final_from}
        final = save_final(model, tokenizer, template, run_dir / "final", labels=labels, meta=meta)
    state = result.state
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - t0, 1),
        "loop_seconds": round(result.seconds, 1), "task": task, "record_kind": kind, "stopped": stopped,
        "reason": reason, "final_from": final_from,
        "steps": getattr(state, "step", None), "tokens": getattr(state, "tokens", None),
        "trained_tokens": getattr(state, "trained_tokens", None), "best_step": getattr(state, "best_step", None),
        "best_metric": getattr(state, "best_metric", None), "precision": getattr(result, "precision", None),
        "seed": cfg.seed, "padding_free": padding_free, "pooling": pooling, "versions": _versions(), "data_hash": prepared.content_hash,
        "config_sha256": hashlib.sha256(config.to_yaml().encode()).hexdigest(), "estimate": estimate_info,
        "final_files": {str(p.relative_to(final)): _sha256(p) for p in sorted(final.rglob("*")) if p.is_file()} if final else {},
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    if stopped == "collapsed":
        raise TrainingError(reason)
    say(f"done: {stopped} after {manifest['steps']} steps; model in {final}")
    return TrainOutcome(run_dir, stopped, reason)
