"""Before launch: will the run fit in memory, and how long will it take?

    gemcut estimate examples/sft_chatterbot.yaml [key=value ...]

Memory, per part:
- weights: every parameter at its dtype (tied weights once);
- gradients: one per trainable parameter, at its dtype;
- optimizer: AdamW keeps two fp32 states (exp_avg, exp_avg_sq) per trainable parameter: 8 bytes each;
- activations: what autograd saves for the backward pass of one micro-batch. Measured exactly by the probe
  (torch.autograd.graph.saved_tensors_hooks sums the storages saved during a real forward of the real
  model at the configured batch and length, parameters excluded); without a probe, an approximation of
  ~(10*hidden + 4*intermediate) values per token per block that trains or sits above a trained block,
  plus the fp32 logits;
- runtime: the resident memory of this process before the model was loaded (Python, torch, tokenizer).
`fits` compares weights + gradients + optimizer + activations with the memory available before loading
(psutil; GPU free memory when training on CUDA).

Time: the probe runs a few forward+backward passes of the real objective on a real batch (bf16 autocast
when the run would use it) and one AdamW step; the first pass is warm-up and not timed. Seconds per
optimizer step = grad_accum x (forward+backward) + optimizer step, scaled by the number of steps.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

from gemcut.errors import TrainingError

GB = 1024**3
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

    @property
    def required_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes

    @property
    def total_bytes(self) -> int:
        return self.required_bytes + self.runtime_bytes

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
            f"total        {gb(self.total_bytes)} of {gb(self.available_bytes + self.runtime_bytes)} "
            f"-> {'fits' if self.fits else 'DOES NOT FIT'}",
        ]
        if self.seconds_per_step is not None:
            line = f"time         {self.seconds_per_step:.2f} s/step"
            if self.steps is not None and self.total_seconds is not None:
                line += f" x {self.steps} steps = {_duration(self.total_seconds)}"
            out.append(line)
        out += [f"note: {n}" for n in self.notes]
        return out

    def __str__(self) -> str:
        text = (f"{self.summary}; needs {self.required_bytes / GB:.2f} GB of {self.available_bytes / GB:.2f} GB available "
                f"on {self.device} ({'fits' if self.fits else 'does not fit'})")
        if self.seconds_per_step is not None:
            text += f"; {self.seconds_per_step:.2f} s/step"
            if self.total_seconds is not None:
                text += f" x {self.steps} steps = {_duration(self.total_seconds)}"
        return text

    def to_dict(self) -> dict:
        return asdict(self) | {"required_bytes": self.required_bytes, "total_bytes": self.total_bytes}


def _duration(seconds: float) -> str:
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


def resolve_task(cfg, kind: str | None) -> str:
    kind_ = cfg.objective.kind
    if kind_ == "auto":
        return "classify" if kind == "label" else "causal_lm"
    return "causal_lm" if kind_ in ("dpo", "ppo", "grpo") else kind_


def approximate_activations(model, batch: int, length: int, bytes_per_value: int, trained_from_block: int | None) -> int:
    """Saved-for-backward bytes of one micro-batch, from the model's shape (see the module docstring)."""
    c = model.config
    h = getattr(c, "hidden_size", 0)
    inter = getattr(c, "intermediate_size", 4 * h)
    layers = getattr(c, "num_hidden_layers", 0)
    active = layers - (trained_from_block or 0)
    per_token = active * (10 * h + 4 * inter)
    logits = batch * length * getattr(c, "vocab_size", 0) * 4 * 2 if hasattr(c, "vocab_size") and getattr(c, "is_decoder", True) else 0
    return batch * length * per_token * bytes_per_value + logits


def measure_saved_bytes(fn, params) -> tuple[object, int]:
    """Run `fn()` and sum the unique storages autograd saves for backward (parameters excluded)."""
    import torch

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

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _examples_for(cfg, task: str, tokenizer):
    """Tokenized training examples of the run's data (None when the config names no data)."""
    if not cfg.data.train:
        return None, None
    from gemcut.data.prepare import prepare
    from gemcut.data.templates import ChatTemplate
    from gemcut.data.tokenize import tokenize_records

    prepared = prepare(cfg.data)
    template = None
    if prepared.kind in ("prompt_completion", "messages", "preference") or (prepared.kind == "label" and task == "causal_lm"):
        template = ChatTemplate.from_tokenizer(tokenizer, cfg.data.template, cfg.data.system_prompt)
    examples, _ = tokenize_records(prepared.iter_records("train") if prepared.kind == "text" else prepared.splits["train"],
                                   prepared.kind, tokenizer, template, cfg.data, task, prepared.labels)
    return prepared, examples


def estimate(cfg, *, probe: bool = True, probe_steps: int = 3) -> Estimate:
    """Memory and time estimate of the run described by `cfg` (RunConfig); see the module docstring."""
    import torch

    from gemcut.models.adapters import apply_adapter
    from gemcut.models.load import load_base, load_tokenizer
    from gemcut.models.resolve import resolve_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runtime = _rss()
    available = available_memory(device)
    notes: list[str] = []

    tokenizer = load_tokenizer(resolve_model(cfg.model.name, cfg.model.revision), trust_remote_code=cfg.model.trust_remote_code)
    kind = cfg.data.kind if cfg.data.kind != "auto" else None
    prepared, examples = None, None
    try:
        task_guess = resolve_task(cfg, kind)
        prepared, examples = _examples_for(cfg, task_guess, tokenizer)
    except ImportError:
        notes.append("the data layer is not available: the probe uses random tokens at max_length")
    kind = prepared.kind if prepared is not None else kind
    task = resolve_task(cfg, kind)
    labels = list(prepared.labels) if prepared is not None and prepared.labels else None

    torch.manual_seed(cfg.train.seed)
    model, _ = load_base(cfg.model, task, num_labels=None if labels else (2 if task == "classify" else None), label_names=labels)
    model = apply_adapter(model, cfg.adapter, task).to(device)
    return estimate_model(cfg, model, task, examples=examples, tokenizer=tokenizer, probe=probe, probe_steps=probe_steps,
                          runtime_bytes=runtime, available_bytes=available, notes=notes)


def estimate_model(cfg, model, task: str, *, examples=None, tokenizer=None, probe: bool = False, probe_steps: int = 3,
                   runtime_bytes: int | None = None, available_bytes: int | None = None, notes: list[str] | None = None) -> Estimate:
    """The estimate for a model already loaded with its adapter (what `gemcut train` checks before fitting).

    Without `probe` nothing runs through the model and no batch is built: the activation size is the shape
    approximation at the longest example (or max_length), so it costs nothing and works for every objective."""
    import torch

    from gemcut.models.adapters import count_parameters, find_blocks, trainable_summary

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

    from gemcut.train.loop import resolve_precision

    precision = resolve_precision(cfg.train.precision, torch.device(device))
    B, L = cfg.train.batch_size, cfg.data.max_length
    if examples:
        longest = max(sum(len(v) for k, v in ex.items() if k.endswith("input_ids")) for ex in examples)
        batch_shape = (B, min(L, longest))
    else:
        batch_shape = (B, L)
    batch = None
    if probe:
        from gemcut.data.collate import collate_causal, collate_classify

        if examples:
            rng = random.Random(cfg.train.seed)
            sample = rng.sample(examples, min(B, len(examples)))
        else:
            g = torch.Generator().manual_seed(cfg.train.seed)
            ids = torch.randint(0, len(tokenizer), (B, L), generator=g).tolist()
            sample = [{"input_ids": r, "labels": r} if task == "causal_lm" else {"input_ids": r, "label": 0} for r in ids]
        collate = collate_causal if task == "causal_lm" else collate_classify
        batch = {k: v.to(device) for k, v in collate(sample, tokenizer.pad_token_id).items()}
        batch_shape = tuple(batch["input_ids"].shape)

    trained_from = None
    if cfg.adapter.method == "freeze":
        try:
            trained_from = len(find_blocks(model)[1]) - cfg.adapter.train_last_n_layers
        except Exception:
            trained_from = None
    activations, source, seconds_per_step = 0, "approximate", None
    if probe:
        from gemcut.objectives import build_objective

        objective = build_objective(task)
        params = [p for p in model.parameters()]
        model.train()
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
        times = []
        for i in range(max(2, probe_steps)):
            t0 = time.perf_counter()
            with autocast:
                out, saved = measure_saved_bytes(lambda: objective(model, batch), params)
            out.loss_sum.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                times.append(time.perf_counter() - t0)
            activations = max(activations, saved)
        source = "measured"
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-12)
        t0 = time.perf_counter()
        opt.step()
        opt_seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        seconds_per_step = cfg.train.grad_accum * sum(times) / len(times) + opt_seconds
        del opt
    else:
        bytes_per_value = 2 if precision == "bf16" else 4
        activations = approximate_activations(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                              batch_shape[0], L, bytes_per_value, trained_from)
    steps = None
    if cfg.train.max_steps:
        steps = cfg.train.max_steps
    elif examples is not None:
        steps = math.ceil(cfg.train.epochs * len(examples) / (cfg.train.batch_size * cfg.train.grad_accum))
    else:
        notes.append("no data given and no train.max_steps: the total time is unknown")
    fits = weights_bytes + grad_bytes + optimizer_bytes + activations <= available
    est = Estimate(
        model=cfg.model.name, method=cfg.adapter.method, task=task, device=device, total_params=total,
        trainable_params=trainable, weights_bytes=weights_bytes, gradients_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes, activations_bytes=int(activations), activations_source=source,
        runtime_bytes=runtime, available_bytes=available, fits=fits, batch_shape=batch_shape, steps=steps,
        seconds_per_step=seconds_per_step,
        total_seconds=seconds_per_step * steps if seconds_per_step is not None and steps is not None else None,
        precision=precision, summary=trainable_summary(model, cfg.adapter), notes=notes,
    )
    return est


def ensure_fits(est: Estimate, force: bool) -> None:
    """Refuse a run predicted not to fit, unless `train.force` says to start anyway."""
    if est.fits or force:
        return
    raise TrainingError(
        f"the run needs about {est.required_bytes / GB:.2f} GB (weights {est.weights_bytes / GB:.2f}, gradients "
        f"{est.gradients_bytes / GB:.2f}, optimizer {est.optimizer_bytes / GB:.2f}, activations {est.activations_bytes / GB:.2f}) "
        f"but only {est.available_bytes / GB:.2f} GB is available on {est.device}. Lower train.batch_size or "
        "data.max_length, use adapter.method=lora, or set train.force=true to start anyway"
    )
