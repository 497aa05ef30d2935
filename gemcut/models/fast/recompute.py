"""What a decoder keeps for the backward pass: the activation plans none, selective and full.

    python -m pytest -q tests/test_recompute.py

`train.activation_checkpointing` picks one plan (gemcut/train/estimate.py, `choose_activation_plan`, picks
for `auto`):
- none: autograd keeps everything it saves (the fastest, the most memory);
- full: transformers' activation checkpointing (non-reentrant): each decoder layer keeps only its input and
  runs its forward again in the backward pass (the least memory, about a third more compute);
- selective (this module): each decoder layer keeps its matrix-multiply outputs and recomputes the cheap
  elementwise parts in the backward pass.

Why selective pays: on smollm2-135m (Llama, LoRA on all linear layers, bf16 autocast) a decoder layer saves
about 27 KB a token for the backward pass (measured with saved_tensors_hooks), and over half of it is copies
that elementwise ops made: the MLP keeps SiLU(gate) and SiLU(gate) * up beside gate and up (4 x 3 KB); each
of the five LoRA A matrices keeps its own bf16 copy of its input, because peft casts a bf16 input up to the
fp32 of the LoRA weights and autocast casts it back down, a fresh tensor each time (5 x 1.1 KB); and the
RMSNorm outputs are those inputs again. The selective plan keeps, per layer: the two fp32 residual-stream
inputs of the norms (the norms' own backward needs them), the attention's q, k, v, output and log-sum-exp
(SDPA's fused CPU and GPU kernels keep no probability matrix: its backward recomputes the probabilities
block by block, which is the attention recomputation this plan relies on), the o_proj input, gate and up:
about 15 KB a token. In the backward pass it recomputes each RMSNorm output (and its cast to the autocast
dtype), SiLU(gate) and SiLU(gate) * up, once per layer, from what it kept: elementwise work beside six
matrix multiplies per kept tensor.

How: each decoder layer runs its forward inside `torch.autograd.graph.saved_tensors_hooks`. The patched
norms and MLP register the tensors they make cheaply, with the function and inputs that make them again;
when autograd saves one of those tensors (or a view of it, as a linear layer saves its input flattened), the
hook stores the recipe instead of the tensor, and hands back the recomputed tensor (with the same view) in
the backward pass. The recomputation runs the same ops on the same inputs under the forward's autocast
state, so it gives the same bits, and the loss and gradients are identical to the none plan
(tests/test_recompute.py). Under autocast, the norm casts its output to the autocast dtype once (what each
linear layer would do on its own), and peft's cast of a LoRA A input to the LoRA weight's dtype is switched
off inside the layer: autocast casts it straight back, so skipping the round trip changes no value.

It applies to the decoder layers of the model types in SELECTIVE_MODEL_TYPES (their layers all run
norm -> attention -> residual -> norm -> gated MLP -> residual; RELIES_ON names what the patches call).
Tensors that the hooks keep are reported to `observed_saves` listeners, so the estimate's measurement of
saved bytes (gemcut/train/estimate.py, `measure_saved_bytes`) sees what really stays in memory.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
import transformers
from torch import nn

from gemcut.errors import TrainingError
from gemcut.models.fast.bert_layout import FastPathError

PLANS = ("none", "selective", "full")
# Model types whose decoder layers are norm -> attention -> residual -> norm -> gated MLP -> residual, so that
# each norm's output goes only into linear layers (Gemma 2/3 put a norm on the attention output instead).
SELECTIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# What the patches call, from each decoder layer.
RELIES_ON = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj", "mlp.act_fn")

_listeners: list[Callable[[torch.Tensor], object]] = []  # `observed_saves` packs, told what the layers keep
_registries: list[_Recipes] = []  # one per decoder layer forward running now (innermost last)


class _Recipe:
    """How to make a registered tensor again: fn(*inputs) under the forward's autocast state, once."""

    __slots__ = ("fn", "inputs", "autocast", "value")

    def __init__(self, fn, inputs, autocast):
        self.fn, self.inputs, self.autocast, self.value = fn, inputs, autocast, None

    def recompute(self) -> torch.Tensor:
        # Cached: the recipe lives as long as the saved slots that point at it, so the value goes with them.
        if self.value is None:
            device, enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                self.value = self.fn(*self.inputs)
        return self.value


class _Recipes:
    """The cheap tensors one decoder layer's forward made, by storage, and the saved-tensor hooks that use them."""

    def __init__(self):
        self.by_storage: dict[int, tuple[weakref.ref, int, _Recipe]] = {}
        # by storage: [the output (weakly), the norm, its input, the autocast dtype, its one cast once made]
        self.norm_outputs: dict[int, list] = {}

    def register(self, out: torch.Tensor, fn, *inputs: torch.Tensor) -> torch.Tensor:
        if out.is_contiguous():  # a recomputed tensor is contiguous: views of it line up with the original's
            device = out.device.type
            state = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            self.by_storage[out.untyped_storage().data_ptr()] = (weakref.ref(out), out.storage_offset(),
                                                                 _Recipe(fn, inputs, state))
        return out

    def register_norm(self, out: torch.Tensor, norm, norm_input: torch.Tensor) -> None:
        """A norm's output: recomputed from the norm's input when saved; under autocast, cast once for all the
        linear layers it feeds (`shared_cast`), and that cast recomputed the same way."""
        self.register(out, norm, norm_input)
        device = out.device.type
        if torch.is_autocast_enabled(device) and out.dtype in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.get_autocast_dtype(device)
            if out.dtype != dtype:
                # A new entry, cast not made yet: a freed output's storage may come back for the next norm's.
                self.norm_outputs[out.untyped_storage().data_ptr()] = [weakref.ref(out), norm, norm_input, dtype, None]

    def shared_cast(self, x: torch.Tensor) -> torch.Tensor | None:
        entry = self.norm_outputs.get(x.untyped_storage().data_ptr()) if x.layout == torch.strided else None
        if entry is None or entry[0]() is not x:
            return None
        _, norm, norm_input, dtype, cast = entry
        if cast is None:

            def make(inp):
                return norm(inp).to(dtype)

            cast = entry[4] = self.register(x.detach().to(dtype), make, norm_input)
        return _SharedCast.apply(x, cast)

    def pack(self, saved: torch.Tensor):
        entry = self.by_storage.get(saved.untyped_storage().data_ptr()) if saved.layout == torch.strided else None
        registered = entry[0]() if entry else None
        if registered is None or registered.dtype != saved.dtype or saved.untyped_storage().data_ptr() != \
                registered.untyped_storage().data_ptr():
            for listen in _listeners:
                listen(saved)
            return saved
        _, offset, recipe = entry
        for listen in _listeners:
            for kept in recipe.inputs:
                listen(kept)
        return recipe, tuple(saved.shape), saved.stride(), saved.storage_offset() - offset


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    recipe, shape, stride, offset = packed
    return recipe.recompute().as_strided(shape, stride, offset)


def _register(out: torch.Tensor, fn, *inputs: torch.Tensor) -> torch.Tensor:
    return _registries[-1].register(out, fn, *inputs) if _registries else out


def _norm_forward(plain):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        out = plain(hidden_states)
        if _registries:
            _registries[-1].register_norm(out, plain, hidden_states)
        return out

    return forward


class _SharedCast(torch.autograd.Function):
    """`cast` (x in the autocast dtype, made once) as one linear layer's own cast of x: the gradient goes back to
    x in x's dtype, as autocast's cast would send it, so the gradients of x's consumers still add up in x's
    dtype, in the same order (adding them in bf16 first, as one shared cast would, changes the sum)."""

    @staticmethod
    def forward(ctx, x, cast):
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def _cast_input(module: nn.Module, args: tuple):
    """A linear layer's forward pre-hook: a norm output arrives as the layer's share of one cast (see _SharedCast)."""
    if not _registries or not args or not isinstance(args[0], torch.Tensor):
        return None
    shared = _registries[-1].shared_cast(args[0])
    return None if shared is None else (shared, *args[1:])


def _mlp_forward(mlp: nn.Module):
    def act_times_up(gate, up):
        return mlp.act_fn(gate) * up

    def forward(x: torch.Tensor) -> torch.Tensor:
        # LlamaMLP's forward, in its order (gate, act, up: a LoRA dropout draws its masks in this order).
        gate = mlp.gate_proj(x)
        act = _register(mlp.act_fn(gate), mlp.act_fn, gate)
        up = mlp.up_proj(x)
        return mlp.down_proj(_register(act * up, act_times_up, gate, up))

    return forward


def _layer_forward(layer: nn.Module, plain):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return plain(*args, **kwargs)
        registry = _Recipes()
        _registries.append(registry)
        skipped = _skip_peft_input_casts(layer)
        try:
            with torch.autograd.graph.saved_tensors_hooks(registry.pack, _unpack):
                return plain(*args, **kwargs)
        finally:
            _registries.pop()
            for lora in skipped:
                lora.cast_input_dtype_enabled = True

    forward.recomputes_selectively = True
    return forward


def _skip_peft_input_casts(layer: nn.Module) -> list[nn.Module]:
    """Under autocast, switch off peft's cast of each plain LoRA layer's input to the LoRA weights' dtype (see the
    module docstring: autocast casts it straight back); returns the layers to switch back on."""
    hidden = next((p for p in layer.parameters()), None)
    if hidden is None or not torch.is_autocast_enabled(hidden.device.type):
        return []
    skipped = []
    for module in layer.modules():
        if getattr(module, "cast_input_dtype_enabled", False) and hasattr(module, "lora_A") and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = False
            skipped.append(module)
    return skipped


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of `model` (or of the model inside a peft / DDP wrapper): modules whose class name ends
    in DecoderLayer."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def _model_type(model: nn.Module) -> str | None:
    return next((getattr(m.config, "model_type", None) for m in model.modules() if hasattr(m, "config")), None)


def selective_missing(model: nn.Module) -> list[str]:
    """Why the selective plan cannot run on `model`: empty when it can; else the reasons (a model type it was
    not written for, or what of RELIES_ON a layer lacks, as "Class.attribute")."""
    model_type, layers = _model_type(model), decoder_layers(model)
    if model_type not in SELECTIVE_MODEL_TYPES or not layers:
        return [f"model type {model_type!r} (selective recomputation is written for {', '.join(SELECTIVE_MODEL_TYPES)})"]
    gone: list[str] = []
    for layer in layers[:1]:  # the layers of one model are one class
        for path in RELIES_ON:
            obj = layer
            for step in path.split("."):
                if not hasattr(obj, step):
                    gone.append(f"{type(obj).__name__}.{step}")
                    break
                obj = getattr(obj, step)
    return gone


def use_selective_recomputation(model: nn.Module) -> int:
    """Patch every decoder layer of `model` for the selective plan (see the module docstring); returns how many.
    Raises FastPathError when the model is not one the plan is written for or lacks what RELIES_ON names."""
    gone = selective_missing(model)
    if gone:
        raise FastPathError(f"selective recomputation (gemcut/models/fast/recompute.py) cannot run on this model: "
                            f"{', '.join(gone)} (transformers {transformers.__version__}); "
                            "set train.activation_checkpointing=true (full recomputation) or false")
    layers = [layer for layer in decoder_layers(model) if not _patched(layer)]
    for layer in layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = _norm_forward(norm.forward)
        layer.mlp.forward = _mlp_forward(layer.mlp)
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_pre_hook(_cast_input)
        layer.forward = _layer_forward(layer, layer.forward)
    return len(layers)


def _patched(module: nn.Module) -> bool:
    return getattr(module.forward, "recomputes_selectively", False)


def installed(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a peft / DDP wrapper) runs the selective plan."""
    return any(_patched(m) for m in decoder_layers(model))


def enable_full_recomputation(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (so frozen inputs, as under LoRA, are fine)."""
    if not getattr(model, "supports_gradient_checkpointing", True):
        raise TrainingError(f"{type(model).__name__} does not support activation checkpointing; "
                            "set train.activation_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_plan(model: nn.Module, plan: str) -> str:
    """Make `model` run `plan` (one of PLANS; "none" changes nothing) and return it."""
    if plan not in PLANS:
        raise ValueError(f"activation plan {plan!r}: expected one of {', '.join(PLANS)}")
    if plan == "full":
        enable_full_recomputation(model)
    elif plan == "selective":
        use_selective_recomputation(model)
    return plan


def plan_of(model: nn.Module) -> str:
    """The plan `model` runs: "full" when transformers' checkpointing is on, "selective" when this module's
    patches are installed, else "none"."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    full = getattr(inner, "is_activation_checkpointing", None)  # transformers >= 5.2; the old name warns there
    if full is None:
        full = getattr(inner, "is_gradient_checkpointing", False)
    if full:
        return "full"
    return "selective" if installed(model) else "none"


@contextlib.contextmanager
def observed_saves(pack: Callable[[torch.Tensor], object]) -> Iterator[None]:
    """`torch.autograd.graph.saved_tensors_hooks(pack, identity)` that also sees inside selectively recomputed
    layers (whose own hooks would hide them): `pack` is called with every tensor autograd keeps, and with the
    inputs a recipe keeps instead of a recomputed tensor. `pack`'s return value is ignored."""
    _listeners.append(pack)

    def keep(t):
        pack(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            yield
    finally:
        _listeners.remove(pack)
