"""Before launch: will the run fit in memory, and how long will `gemcut train` take?

    gemcut estimate examples/sft_chatterbot.yaml [key=value ...]

Memory, per part:
- weights: every parameter at its dtype (tied weights once);
- gradients: one per trainable parameter, at its dtype;
- optimizer: AdamW keeps two fp32 states (exp_avg, exp_avg_sq) per trainable parameter: 8 bytes each;
- activations: what autograd saves for the backward pass of the largest micro-batch the run will see. The
  probe measures it on a real micro-batch (torch.autograd.graph.saved_tensors_hooks sums the storages saved
  during a real forward of the real model, parameters excluded) and scales it by tokens to the largest one;
  without a probe, an approximation of ~(10*hidden + 4*intermediate) values per token per block that trains
  or sits above a trained block, plus the fp32 logits;
- runtime: the resident memory of this process before the model was loaded (Python, torch, tokenizer).
`fits` compares weights + gradients + optimizer + activations with the memory available before loading
(psutil; GPU free memory when training on CUDA).

Processes: `estimate(cfg, processes=N)` (`gemcut estimate CONFIG --processes N`; by default the launcher's
WORLD_SIZE, else 1) adds `Estimate.strategies`, a row per way of sharing the run over N processes (DDP,
FSDP2 full and grad_op, ZeRO-1/2/3, offload where configured) with its bytes per process and whether it
fits, and marks the configured one (`train.distributed`), whose verdict is then `fits`. The formulas are in
gemcut/train/strategy_memory.py: W, G, O above, divided by N where the strategy shards them, plus the
parameters it gathers and DDP's gradient buckets, and the activations of one process's micro-batch
(`micro_batch_size(train, N)` rows instead of `micro_batch_size(train, 1)`). With N = 1 every row is the
one-process figure above.

Time: the wall time of `gemcut train` on this machine as it is now (a loaded machine gives a longer
estimate, and a longer run), in parts:
- prepare, load: measured, by running the same data preparation and loading the same model, with the
  changes the run makes to it (fast dropout, frozen linear weights stored in bf16 under bf16 autocast);
- tokenize: a seeded sample of at most SAMPLE_RECORDS training records (all of them when fewer) is tokenized
  and timed, and the time per record is multiplied by the records the run tokenizes;
- steps: `fit` takes its micro-batches in `epoch_order` (seeded; length-grouped unless the model runs
  padding-free), so `plan_steps` lists every step's micro-batches from the token lengths: the real ones
  when every record was tokenized, else lengths drawn from the sample. A micro-batch costs in proportion to
  the token positions the model computes (`batch_tokens`: rows x longest row when padded, the real tokens
  when padding-free). The probe times the micro-batch of median cost: one forward+backward on a quarter of
  its rows (two at least) to warm up (not timed), then one timed pass of the whole micro-batch, and more, up to
  `probe_steps` in all, while they are expected to end within PROBE_SECONDS of timing; each step
  costs its micro-batches scaled from that time, plus one timed AdamW step. Timing a random batch at its
  longest row instead, as this module once did, charged SFT steps for padding that length grouping removes
  (about 2x on chatterbot);
- validation: every `eval_every` steps and at the end, the validation batches (sorted by length, as
  `evaluate` does) forward only, scaled from one timed forward of the probe micro-batch (after one
  untimed forward of the warm-up rows);
- samples: SFT runs generate `sample_prompts` greedy completions at each evaluation, each at most
  min(eval.max_new_tokens, 48) tokens: that many one-token forwards (timed once), an upper bound.
Not counted: Python start-up and imports (a few seconds), checkpoint writes (a LoRA adapter's are small),
early stopping (which only shortens a run). PPO/GRPO are timed as the causal-LM loss, without their
generation. Whatever the data size, the probe runs the model at most `probe_steps` + 4 times (two warm-ups
on a quarter of the rows, timed passes, one validation forward, one one-token forward; counted in
`Estimate.probe_passes`), timed passes
after the first only within PROBE_SECONDS; so the estimate takes the data preparation, the model load, the
tokenized sample, and about two passes or PROBE_SECONDS more.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

from gemcut.errors import TrainingError
from gemcut.tasks import Task, resolve_task, task_named
from gemcut.train.strategy_memory import ModelBytes, StrategyMemory, strategy_table, unit_bytes

GB = 1024**3
SAMPLE_RECORDS = 1024  # training records tokenized to learn the token lengths (all of them when there are fewer)
PROBE_SECONDS = 4.0  # timed passes after the first only while they are expected to end within this budget
ADAM_BYTES = 8  # two fp32 states per trainable parameter


@dataclass
class Estimate:
    model: str
    method: str
    task: str
    device: str
    total_params: int
    trainable_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_source: str  # "measured" or "approximate"
    runtime_bytes: int
    available_bytes: int
    fits: bool
    batch_shape: tuple[int, int] | None = None
    steps: int | None = None
    seconds_per_step: float | None = None
    total_seconds: float | None = None
    precision: str = "fp32"
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    time_parts: dict[str, float] | None = None  # seconds of the run by part (see the module docstring)
    probe_passes: dict[str, int] | None = None  # how many times the probe ran the model, by kind of pass
    estimate_seconds: float | None = None  # wall time of `estimate` itself
    processes: int = 1  # processes the strategies' rows are for
    process_micro_batch: int | None = None  # examples per forward on each of them (micro_batch_size(train, processes))
    strategies: list[StrategyMemory] = field(default_factory=list)  # per process, by strategy (strategy_memory.py)

    @property
    def required_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes

    @property
    def total_bytes(self) -> int:
        return self.required_bytes + self.runtime_bytes

    @property
    def configured(self) -> StrategyMemory | None:
        """The row of the strategy the config names (`train.distributed`)."""
        return next((row for row in self.strategies if row.configured), None)

    def strategy_lines(self) -> list[str]:
        """The per-process table (the configured strategy marked with *), or a hint with one process."""
        if self.processes == 1:
            return ["strategies   one process shares nothing (--processes N: DDP, FSDP2 and ZeRO per device)"]
        shared = f"; on {self.device} the {self.processes} processes share this machine's memory" if self.device == "cpu" else ""
        cols = ("weights", "gradients", "optimizer", "activations", "gathered", "buffers", "offloaded", "device_bytes")
        head = ("weights", "grads", "optimizer", "activations", "gathered", "buffers", "offloaded", "per process")
        out = [f"per process on {self.processes} processes (activations of micro-batches of {self.process_micro_batch}){shared}:",
               f"  {'strategy':<22}" + "".join(f"{h:>12}" for h in head)]
        for row in self.strategies:
            mark = "*" if row.configured else " "
            out.append(f"{mark} {row.name:<22}" + "".join(f"{_size(getattr(row, c)):>12}" for c in cols)
                       + f"  {'fits' if row.fits else 'DOES NOT FIT'}")
        return out

    def lines(self) -> list[str]:
        def gb(n: int) -> str:
            return f"{n / GB:.2f} GB"

        out = [
            f"model {self.model} ({self.task}, {self.method}, on {self.device}, {self.precision})",
            f"parameters  {self.summary}",
            f"weights      {gb(self.weights_bytes)}",
            f"gradients    {gb(self.gradients_bytes)}",
            f"optimizer    {gb(self.optimizer_bytes)}  (AdamW, 2 fp32 states per trainable parameter)",
            f"activations  {gb(self.activations_bytes)}  ({self.activations_source}"
            + (f", micro-batch {self.batch_shape[0]}x{self.batch_shape[1]})" if self.batch_shape else ")"),
            f"runtime      {gb(self.runtime_bytes)}  (this process before loading the model)",
            f"total        {gb(self.total_bytes)} of {gb(self.available_bytes + self.runtime_bytes)}"
            + (f" -> {'fits' if self.fits else 'DOES NOT FIT'}" if self.processes == 1 else " (one process holding all)"),
            *self.strategy_lines(),
        ]
        if self.seconds_per_step is not None:
            line = f"time         {self.seconds_per_step:.2f} s/step"
            if self.steps is not None and self.time_parts:
                line += f" x {self.steps} steps; the run about {_duration(self.total_seconds)} ("
                line += ", ".join(f"{k} {_duration(v)}" for k, v in self.time_parts.items()) + ")"
            out.append(line)
        if self.estimate_seconds is not None:
            out.append(f"estimated in {self.estimate_seconds:.0f} s" + (" (" + ", ".join(
                f"{n} {k}" for k, n in self.probe_passes.items()) + " passes)" if self.probe_passes else ""))
        out += [f"note: {n}" for n in self.notes]
        return out

    def __str__(self) -> str:
        needs = f"{self.required_bytes / GB:.2f} GB"
        if self.processes > 1 and self.configured is not None:
            row = self.configured
            if self.device == "cpu":  # the processes share this machine's memory, offloaded or not
                needs = f"{self.processes} x {(row.device_bytes + row.offloaded) / GB:.2f} GB"
            else:
                needs = f"{row.device_bytes / GB:.2f} GB per device"
            needs += f" ({row.name}, {self.processes} processes)"
        text = (f"{self.summary}; needs {needs} of {self.available_bytes / GB:.2f} GB available "
                f"on {self.device} ({'fits' if self.fits else 'does not fit'})")
        if self.seconds_per_step is not None:
            text += f"; {self.seconds_per_step:.2f} s/step"
            if self.total_seconds is not None:
                text += f" x {self.steps} steps, the run about {_duration(self.total_seconds)}"
        return text

    def to_dict(self) -> dict:
        return asdict(self) | {"required_bytes": self.required_bytes, "total_bytes": self.total_bytes}


def _size(n: int) -> str:
    for unit, size in (("GB", GB), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def available_memory(device: str) -> int:
    """Bytes free for the run: CUDA free memory, or available system memory (psutil, else /proc/meminfo)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise TrainingError("cannot tell how much memory is available (no psutil, no /proc/meminfo)")


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    return 0


def timed_task(task: Task) -> Task:
    """The task whose loss the probe times: the run's own, except that PPO and GRPO are timed as the causal-LM
    loss on their records (their generation is not timed; see the module docstring)."""
    return task_named("causal_lm") if task.rollouts else task


def approximate_activations(model, batch: int, length: int, bytes_per_value: int, trained_from_block: int | None,
                            plan: str | None = None) -> int:
    """Saved-for-backward bytes of one micro-batch, from the model's shape (see the module docstring), under the
    activation plan `plan` (gemcut/models/fast/recompute.py; default: the one `model` runs). Per token and block:
    - none: ~(10*hidden + 4*intermediate) values;
    - selective: the fp32 inputs of the two norms, q, k, v, the attention output and o_proj's input, gate and up:
      (3*hidden + 2*kv + 2*intermediate) values + 8*hidden bytes (smollm2-135m, measured: 16 KB of 29 KB);
    - full: the block's fp32 input, plus one block's none-plan activations while it is recomputed."""
    from gemcut.models.fast.recompute import plan_of

    c = model.config
    h = getattr(c, "hidden_size", 0)
    inter = getattr(c, "intermediate_size", 4 * h)
    heads = getattr(c, "num_attention_heads", 1) or 1
    kv = h * (getattr(c, "num_key_value_heads", None) or heads) // heads
    layers = getattr(c, "num_hidden_layers", 0)
    active = layers - (trained_from_block or 0)
    plan = plan or plan_of(model)
    kept = (10 * h + 4 * inter) * bytes_per_value
    if plan == "selective":
        kept = (3 * h + 2 * kv + 2 * inter) * bytes_per_value + 8 * h
    per_token = active * kept
    if plan == "full":
        per_token = active * 4 * h + (10 * h + 4 * inter) * bytes_per_value
    logits = batch * length * getattr(c, "vocab_size", 0) * 4 * 2 if hasattr(c, "vocab_size") and getattr(c, "is_decoder", True) else 0
    return batch * length * per_token + logits


def choose_activation_plan(cfg, model, task: str) -> tuple[str, str]:
    """(plan, why): the activation plan `train.activation_checkpointing` asks for (false: none, true: full,
    selective). For auto: the fastest of none, selective, full (selective only where the model has it) whose
    estimate (no probe: micro-batches at data.max_length) fits train.memory_budget_gb, else the memory available
    now; full when none fits. `model` is loaded with its adapter, no plan applied yet."""

    from gemcut.models.fast.recompute import PLANS, selective_missing
    from gemcut.models.precision import resolve_precision
    from gemcut.train.distributed import launched_processes, micro_batch_size

    setting = cfg.train.activation_checkpointing
    if setting != "auto":
        plan = {True: "full", False: "none"}.get(setting, setting)
        return plan, f"train.activation_checkpointing={str(setting).lower()}"
    est = estimate_model(cfg, model, task)
    budget = int(cfg.train.memory_budget_gb * GB) if cfg.train.memory_budget_gb else est.available_bytes
    source = "train.memory_budget_gb" if cfg.train.memory_budget_gb else "the memory available"
    precision = resolve_precision(cfg.train.precision, next(model.parameters()).device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trained_from = None
    if cfg.adapter.method == "freeze":
        from gemcut.models.adapters import find_blocks

        trained_from = len(find_blocks(model)[1]) - cfg.adapter.train_last_n_layers
    micro = micro_batch_size(cfg.train, launched_processes())
    others = est.required_bytes - est.activations_bytes
    needs = {}
    for plan in PLANS:
        if plan == "selective" and selective_missing(model):
            continue
        needs[plan] = others + approximate_activations(base, micro, cfg.data.max_length, 2 if precision == "bf16" else 4,
                                                       trained_from, plan=plan)
        if needs[plan] <= budget:
            return plan, (f"auto: the fastest plan that fits {budget / GB:.2f} GB ({source}); it needs about "
                          f"{needs[plan] / GB:.2f} GB")
    return "full", (f"auto: no plan fits {budget / GB:.2f} GB ({source}); full, the smallest, needs about "
                    f"{needs['full'] / GB:.2f} GB")


def measure_saved_bytes(fn, params) -> tuple[object, int]:
    """Run `fn()` and sum the unique storages autograd saves for backward (parameters excluded); inside a
    selectively recomputed layer, what it keeps instead of the tensors it recomputes."""

    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse, meta)
            pass
        return t

    from gemcut.models.fast.recompute import observed_saves

    with observed_saves(pack):  # saved_tensors_hooks that see inside selectively recomputed layers too
        out = fn()
    return out, sum(seen.values())


def plan_steps(lengths: list[int], *, batch_size: int, micro_batch_size: int, steps: int, seed: int,
               grouped: bool) -> list[list[list[int]]]:
    """The micro-batches (example indices) of each of `steps` optimizer steps, in the order `fit` takes them
    on one process: `epoch_order` per epoch, `batch_size` examples a step cut into micro-batches of
    `micro_batch_size`, a new epoch when the data runs out."""
    from gemcut.train.batches import epoch_order

    per_step, plan, epoch, index, order = batch_size, [], 0, 0, None
    for _ in range(steps):
        if order is None:
            order = epoch_order(lengths, seed=seed, epoch=epoch, batch_size=micro_batch_size, group_by_length=grouped)
        take = order[index:index + per_step]
        plan.append([take[s:s + micro_batch_size] for s in range(0, len(take), micro_batch_size)])
        index += len(take)
        if index >= len(lengths):
            epoch, index, order = epoch + 1, 0, None
    return plan


def batch_tokens(lengths: list[int], padded: bool) -> int:
    """Token positions a micro-batch of examples with these lengths computes: rows x longest when padded."""
    return len(lengths) * max(lengths) if padded else sum(lengths)


def total_steps(cfg, n_examples: int | None) -> int | None:
    """`fit`'s step count: train.max_steps, else epochs x ceil(examples / examples per step); None when unknown."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    if n_examples is None:
        return None
    return max(1, math.ceil(cfg.train.epochs * math.ceil(n_examples / cfg.train.batch_size)))


def evaluations(steps: int, eval_every: int | None) -> int:
    """How many validations `fit` runs in `steps` steps: every `eval_every` steps and at the last step."""
    return (steps // eval_every if eval_every else 0) + (0 if eval_every and steps % eval_every == 0 else 1)


@dataclass
class _Data:
    """What the estimate knows of the run's data: the tokenized sample and how many records it stands for."""

    kind: str | None
    labels: list[str] | None
    train: list[dict] | None  # tokenized training examples of the sample (all, when sampled is False)
    validation: list[dict]  # tokenized validation examples scored during training (or a sample of them)
    n_train: int | None  # training examples the run will have
    n_validation: int  # validation examples scored at each evaluation
    sampled: bool
    prepare_seconds: float = 0.0
    tokenize_seconds: float = 0.0  # the whole run's tokenization, scaled from the sample


def _sample(records, n: int, seed: int) -> list[dict]:
    records = list(records)
    return records if len(records) <= n else random.Random(seed).sample(records, n)


def _data(cfg, task_of, tokenizer_for) -> _Data:
    """Prepare the run's data, tokenize a sample of it and scale the counts (see the module docstring).

    `task_of(kind)` resolves the Task; `tokenizer_for(kind, labels)` loads the model and returns its tokenizer."""
    from gemcut.data.prepare import prepare
    from gemcut.data.templates import ChatTemplate
    from gemcut.data.tokenize import resolve_label_names, tokenize_records

    t0 = time.perf_counter()
    prepared = prepare(cfg.data)
    prepare_seconds = time.perf_counter() - t0
    kind, counts = prepared.kind, prepared.counts()
    task = task_of(kind)
    train_records = (list(itertools.islice(prepared.iter_records("train"), SAMPLE_RECORDS)) if kind == "text"
                     else prepared.splits["train"])
    labels = None
    if kind == "label":  # as the run names them: the declared set, or the sorted labels of the whole training split
        labels = list(prepared.labels or resolve_label_names(list(train_records), cfg.data.labels))
    tokenizer = tokenizer_for(kind, labels)
    template = None
    if task.chat_template(kind, bool(cfg.data.template)) == "required":  # as the run renders them (gemcut/tasks.py)
        template = ChatTemplate.from_tokenizer(tokenizer, cfg.data.template, cfg.data.system_prompt)
    n_train_records = counts.get("train", len(train_records))
    sample = _sample(train_records, SAMPLE_RECORDS, cfg.train.seed)
    val_records = list(prepared.splits.get("validation") or [])[:cfg.train.val_max_examples or None]
    val_sample = _sample(val_records, SAMPLE_RECORDS // 4, cfg.train.seed)
    t0 = time.perf_counter()
    train, _ = tokenize_records(sample, kind, tokenizer, template, cfg.data, task, labels)
    validation = tokenize_records(val_sample, kind, tokenizer, template, cfg.data, task, labels)[0] if val_sample else []
    per_record = (time.perf_counter() - t0) / max(1, len(sample) + len(val_sample))
    sampled = len(sample) < n_train_records
    return _Data(kind=kind, labels=labels, train=train, validation=validation,
                 n_train=round(len(train) * n_train_records / max(1, len(sample))), sampled=sampled,
                 n_validation=round(len(validation) * len(val_records) / max(1, len(val_sample))),
                 prepare_seconds=prepare_seconds, tokenize_seconds=per_record * (n_train_records + len(val_records)))


def _prepare_for_training(model, cfg, precision: str, task: str):
    """The changes `gemcut train` makes to the loaded model that change its speed or memory."""
    from gemcut.models.fast import apply_fast
    from gemcut.models.fast.recompute import apply_plan
    from gemcut.train.bf16 import store_frozen_linears_in_bf16

    apply_fast(model, task_named(task), cfg.train)
    apply_plan(model, choose_activation_plan(cfg, model, task)[0])
    if precision == "bf16":
        store_frozen_linears_in_bf16(model)
    return model


def estimate(cfg, *, probe: bool = True, probe_steps: int = 3, processes: int | None = None) -> Estimate:
    """Memory and time estimate of the run described by `cfg` (RunConfig) on `processes` processes (default:
    the launcher's WORLD_SIZE, else 1); see the module docstring."""
    import torch

    from gemcut.models.adapters import apply_adapter
    from gemcut.models.load import load_base
    from gemcut.models.precision import resolve_precision

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if device == "cpu":
        from gemcut.train.allocator import keep_freed_memory

        keep_freed_memory()  # as `gemcut train` does: the step times are measured with the same allocator
    runtime = _rss()
    available = available_memory(device)
    busy = _busy_note(torch.get_num_threads()) if device == "cpu" else None  # read before this process adds to the load
    notes: list[str] = [busy] if busy else []
    precision = resolve_precision(cfg.train.precision, torch.device(device))
    loaded: dict = {}

    def task_of(kind) -> Task:
        return timed_task(resolve_task(cfg.objective.kind, kind))

    def load(kind, labels):
        task = task_of(kind)
        t0 = time.perf_counter()
        torch.manual_seed(cfg.train.seed)
        classifier = task.head == "classifier"
        model, tokenizer = load_base(cfg.model, task.name, num_labels=None if labels else (2 if classifier else None),
                                     label_names=labels if classifier else None)
        model = _prepare_for_training(apply_adapter(model, cfg.adapter, task.name), cfg, precision, task.name).to(device)
        loaded.update(model=model, tokenizer=tokenizer, task=task.name, seconds=time.perf_counter() - t0)
        return tokenizer

    data = None
    if cfg.data.train:
        data = _data(cfg, task_of, load)
    else:
        notes.append("no data given: the probe uses random tokens at max_length")
        load(cfg.data.kind if cfg.data.kind != "auto" else None, None)
    if data is not None and not data.train:
        notes.append("no training example left after tokenization: the probe uses random tokens at max_length")
    est = estimate_model(cfg, loaded["model"], loaded["task"], examples=data.train if data else None,
                         tokenizer=loaded["tokenizer"],
                         probe=probe, probe_steps=probe_steps, runtime_bytes=runtime, available_bytes=available,
                         notes=notes, data=data, load_seconds=loaded["seconds"], processes=processes)
    est.estimate_seconds = time.perf_counter() - t_start
    return est


def _busy_note(threads: int) -> str | None:
    """A warning when other processes want the cores this run's threads need: then every parallel section
    waits for threads the scheduler has paused, and step times swing several-fold from one step to the next."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return None
    # The 1-minute average trails: a command that just ended still counts, so a whole core's worth of other
    # work must be waiting before the machine is called busy.
    if load <= cores - threads + 1.0:
        return None
    return (f"the machine is busy (load average {load:.1f} on {cores} cores): times measured now are longer than on "
            f"a quiet machine and vary from step to step{'; train.num_threads=1 suffers less' if threads > 1 else ''}")


def _time(fn, device: str) -> float:
    import torch

    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def estimate_model(cfg, model, task: str, *, examples=None, tokenizer=None, probe: bool = False, probe_steps: int = 3,
                   runtime_bytes: int | None = None, available_bytes: int | None = None, notes: list[str] | None = None,
                   data: _Data | None = None, load_seconds: float = 0.0, processes: int | None = None) -> Estimate:
    """The estimate for a model already loaded with its adapter (what `gemcut train` checks before fitting), on
    `processes` processes (default: the launcher's WORLD_SIZE, else 1: what `gemcut train` runs on).

    Without `probe` nothing runs through the model and no batch is built: the activation size is the shape
    approximation at the longest example (or max_length), so it costs nothing and works for every objective.
    With it, `examples` (all the run's training examples, or the sample in `data`) give the step plan."""
    import torch

    from gemcut.models.adapters import count_parameters, find_blocks
    from gemcut.models.fast import applied
    from gemcut.models.precision import autocast, resolve_precision
    from gemcut.train.batches import example_length, resolve_group_by_length
    from gemcut.train.distributed import launched_processes, micro_batch_size

    processes = processes or launched_processes()
    device = next(model.parameters()).device.type
    notes = list(notes or [])
    available = available_bytes if available_bytes is not None else available_memory(device)
    runtime = runtime_bytes if runtime_bytes is not None else _rss()
    trainable, total = count_parameters(model)
    seen, weights_bytes, grad_bytes = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weights_bytes += p.numel() * p.element_size()
            grad_bytes += p.numel() * p.element_size() if p.requires_grad else 0
    optimizer_bytes = trainable * ADAM_BYTES

    precision = resolve_precision(cfg.train.precision, torch.device(device))
    B, L = micro_batch_size(cfg.train, 1), cfg.data.max_length  # one forward's examples
    n_examples = data.n_train if data is not None else (len(examples) if examples is not None else None)
    steps = total_steps(cfg, n_examples)
    if steps is None:
        notes.append("no data given and no train.max_steps: the total time is unknown")
    trained_from = None
    if cfg.adapter.method == "freeze":
        try:
            trained_from = len(find_blocks(model)[1]) - cfg.adapter.train_last_n_layers
        except Exception:
            trained_from = None
    lengths = [example_length(ex) for ex in examples] if examples else None
    if not probe:
        batch_shape = (B, min(L, max(lengths))) if lengths else (B, L)
        bytes_per_value = 2 if precision == "bf16" else 4
        activations = approximate_activations(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                              batch_shape[0], L, bytes_per_value, trained_from)
        return _finish(cfg, model, task, device, total, trainable, weights_bytes, grad_bytes, optimizer_bytes, activations,
                       "approximate", runtime, available, batch_shape, steps, precision, notes,
                       processes)

    from gemcut.objectives import build_objective
    from gemcut.train.batches import collator_for

    spec = timed_task(task_named(task))
    padded = "padding_free" not in applied(model)
    collate = collator_for(spec, tokenizer.pad_token_id)
    if lengths:
        # The plan's examples: all of them, or (sampled data) as many drawn from the sample as the run will have.
        drawn = (random.Random(cfg.train.seed).choices(range(len(examples)), k=max(1, data.n_train))
                 if data is not None and data.sampled else range(len(examples)))
        plan_lengths = [lengths[j] for j in drawn]
        plan = plan_steps(plan_lengths, batch_size=cfg.train.batch_size, micro_batch_size=B, steps=steps or 1,
                          seed=cfg.train.seed, grouped=resolve_group_by_length(cfg.train.group_by_length, not padded))
        costs = [[batch_tokens([plan_lengths[i] for i in mb], padded) for mb in step] for step in plan]
        micro = [(c, mb) for step, step_costs in zip(plan, costs) for c, mb in zip(step_costs, step)]
        probe_cost, probe_ids = sorted(micro, key=lambda m: m[0])[len(micro) // 2]
        largest_cost, largest_ids = max(micro, key=lambda m: m[0])
        rows = [examples[drawn[i]] for i in probe_ids]
        batch_shape = (len(largest_ids), max(plan_lengths[i] for i in largest_ids))
        step_costs = [sum(c) for c in costs]
    else:
        g = torch.Generator().manual_seed(cfg.train.seed)
        ids = torch.randint(0, len(tokenizer), (B, L), generator=g).tolist()
        rows = [random_row(spec, r) for r in ids]
        batch_shape = (B, L)
        probe_cost = largest_cost = batch_tokens([L] * B, padded)
        step_costs = [probe_cost * math.ceil(cfg.train.batch_size / B)]
    to_device = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    batch = to_device(collate(rows))
    # Two rows at least, so that the warm-up takes the code paths of a batch (a shared prompt prefix needs two).
    warm = to_device(collate(rows[:max(2, len(rows) // 4)]))

    labels = data.labels if data is not None else None
    objective = build_objective(spec, cfg, labels=labels, train_examples=[r for r in rows if "label" in r])
    params = list(model.parameters())
    in_precision = autocast(precision, device)
    saved = 0

    def train_pass(b):
        nonlocal saved
        with in_precision:
            out, saved = measure_saved_bytes(lambda: objective(model, b), params)
        out.loss_sum.backward()

    model.train()
    train_pass(warm)  # warm-up: first-call allocations and kernel selection, not timed
    times = [_time(lambda: train_pass(batch), device)]
    # More passes average out noise, but only while they fit in PROBE_SECONDS: a slow model is timed once.
    while len(times) < probe_steps and sum(times) * (1 + 1 / len(times)) <= PROBE_SECONDS:
        times.append(_time(lambda: train_pass(batch), device))
    activations = saved * largest_cost / probe_cost
    from gemcut.train.optimizer import adamw

    opt = adamw([{"params": [p for p in params if p.requires_grad]}], lr=1e-12, weight_decay=0.0)
    opt.step()  # the first step allocates the states
    opt_seconds = _time(opt.step, device)
    model.zero_grad(set_to_none=True)
    del opt
    per_token = sum(times) / len(times) / probe_cost
    passes = {"warm-up": 1, "train": len(times)}
    parts: dict[str, float] = {}
    # Each step: its micro-batches scaled from the probe's time per token, and the optimizer step.
    seconds_per_step = sum(step_costs) / len(step_costs) * per_token + opt_seconds
    if steps is not None:
        parts["steps"] = steps * seconds_per_step  # the plan has every step when the count is known
    val = data.validation if data is not None else []
    if steps is not None and val:
        model.eval()
        with torch.no_grad(), in_precision:
            objective(model, warm)  # warm-up of the no-grad, eval-mode path
            forward_seconds = _time(lambda: objective(model, batch), device)
        passes["warm-up"] += 1
        passes["validation forward"] = 1
        val_lengths = sorted(example_length(ex) for ex in val)
        val_cost = sum(batch_tokens(val_lengths[s:s + B], padded) for s in range(0, len(val_lengths), B))
        val_cost *= data.n_validation / len(val)
        n_evals = evaluations(steps, cfg.train.eval_every)
        parts["validation"] = n_evals * val_cost * forward_seconds / probe_cost
        if spec.samples and data.kind in ("messages", "prompt_completion") and cfg.train.sample_prompts:
            from gemcut.train.samples import SAMPLE_MAX_NEW_TOKENS

            n_prompts = min(cfg.train.sample_prompts, data.n_validation)
            one = batch["input_ids"][:n_prompts, :1]
            with torch.no_grad(), in_precision:
                token_seconds = _time(lambda: model(input_ids=one, use_cache=False), device)
            passes["one-token forward"] = 1
            parts["samples"] = n_evals * min(cfg.eval.max_new_tokens, SAMPLE_MAX_NEW_TOKENS) * token_seconds
        model.train()
    if data is not None:
        parts = {"prepare": data.prepare_seconds, "tokenize": data.tokenize_seconds, "load": load_seconds, **parts}
    est = _finish(cfg, model, task, device, total, trainable, weights_bytes, grad_bytes, optimizer_bytes, activations,
                  "measured" if largest_cost == probe_cost else "measured, scaled to the largest micro-batch", runtime,
                  available, batch_shape, steps, precision, notes, processes)
    est.seconds_per_step = seconds_per_step
    est.probe_passes = passes
    if steps is not None:
        est.time_parts = parts
        est.total_seconds = sum(parts.values())
    return est


def random_row(task: Task, ids: list[int]) -> dict:
    """A training example of `task`'s batches made of the token ids `ids` (the probe without data)."""
    if task.batches == "classify":
        return {"input_ids": ids, "label": 0}
    if task.batches == "preference":
        return {f"{side}_{field}": ids for side in ("chosen", "rejected") for field in ("input_ids", "labels")}
    return {"input_ids": ids, "labels": ids}


def _finish(cfg, model, task, device, total, trainable, weights_bytes, grad_bytes, optimizer_bytes, activations, source,
            runtime, available, batch_shape, steps, precision, notes, processes) -> Estimate:
    from gemcut.models.adapters import trainable_summary
    from gemcut.train.distributed import micro_batch_size

    # One process's micro-batch at N processes holds fewer rows than the one-process one (the global batch
    # is split); activations grow with the rows.
    micro = micro_batch_size(cfg.train, processes)
    per_process = int(activations * micro / micro_batch_size(cfg.train, 1))
    root, largest_block = unit_bytes(model)
    parts = ModelBytes(weights=weights_bytes, gradients=grad_bytes, optimizer=optimizer_bytes, activations=per_process,
                       root=root, largest_block=largest_block)
    local = min(processes, int(os.environ.get("LOCAL_WORLD_SIZE") or processes))  # the processes on this machine
    host = available_memory("cpu") if device != "cpu" and processes > 1 else None
    table = strategy_table(parts, processes, cfg.train.distributed, device=device, available=available,
                           host_available=host, local_processes=local)
    fits = next(row.fits for row in table if row.configured)
    return Estimate(
        model=cfg.model.name, method=cfg.adapter.method, task=task, device=device, total_params=total,
        trainable_params=trainable, weights_bytes=weights_bytes, gradients_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes, activations_bytes=int(activations), activations_source=source,
        runtime_bytes=runtime, available_bytes=available, fits=fits, batch_shape=tuple(batch_shape), steps=steps,
        precision=precision, summary=trainable_summary(model, cfg.adapter), notes=notes, processes=processes,
        strategies=table, process_micro_batch=micro,
    )

