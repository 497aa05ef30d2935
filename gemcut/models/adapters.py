"""Ways to update a model: LoRA/DoRA adapters (QLoRA on a 4-bit base), freezing all but the last N blocks, or full training.

    python -m pytest -q tests/test_models_adapters.py

- `lora`: peft LoRA (Hu et al., 2021, arXiv:2106.09685) on `adapter.target_modules` ("all-linear" = every
  linear layer except the output head), optionally DoRA (Liu et al., 2024, arXiv:2402.09353). For
  classification and reward models the new head trains in full (peft `modules_to_save`).
- `qlora`: QLoRA (Dettmers et al., 2023, arXiv:2305.14314): the same LoRA, in bf16, on a base that
  `gemcut.models.load.load_base(quantization=adapter.base_quantization())` loaded in 4 bits (NF4 through
  bitsandbytes, CUDA only). peft's `prepare_model_for_kbit_training` first freezes the base and keeps its
  unquantized parameters (norms, embeddings) in fp32; gemcut's own `train.activation_checkpointing`
  decides recomputation, not peft. The saved adapter is an ordinary LoRA adapter: runs load it on the
  unquantized base (gemcut/models/load.py `load_run`).
- `freeze`: transfer learning. Every weight is frozen except the last `adapter.train_last_n_layers`
  transformer blocks and what follows them (final norm, pooler, head). A head tied to the input embeddings
  (SmolLM2's lm_head) stays frozen with them.
- `full`: every weight trains.

The block list is found generically: the longest `nn.ModuleList` of same-typed modules (Llama's
`model.layers`, BERT's `bert.encoder.layer`, GPT-2's `transformer.h`, ...). "What follows the blocks" is read
from parameter registration order, which for transformers models is embeddings, blocks, then norm and head.
"""

from __future__ import annotations

from torch import nn

from gemcut.errors import ConfigError
from gemcut.tasks import task_named


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, module list) of the model's transformer blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if any(p.numel() for p in module.parameters()) and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ConfigError(f"adapter.method=freeze: no list of transformer blocks found in {type(model).__name__}; "
                          "use adapter.method=lora or full")
    return best


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the pre-trained body: the task head (classifier, score, lm_head...)."""
    prefix = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def _freeze(model: nn.Module, n_last: int) -> nn.Module:
    name, blocks = find_blocks(model)
    if n_last > len(blocks):
        raise ConfigError(f"adapter.train_last_n_layers={n_last} but {type(model).__name__} has {len(blocks)} blocks "
                          f"({name}); set it to at most {len(blocks)}")
    block_of = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            block_of[id(p)] = i
    first_trained = len(blocks) - n_last
    seen_blocks = False
    for p in model.parameters():  # deduplicated, in registration order: embeddings, blocks, norm/head
        i = block_of.get(id(p))
        if i is not None:
            seen_blocks = True
            p.requires_grad_(i >= first_trained)
        else:
            # Before the blocks: embeddings (frozen). After them: final norm, pooler, head (trained). A tied
            # lm_head is the embedding tensor itself, met before the blocks, so it stays frozen.
            p.requires_grad_(seen_blocks)
    model._gemcut_freeze = (name, len(blocks), n_last)
    return model


def apply_adapter(model: nn.Module, cfg, task: str) -> nn.Module:
    """Make `model` trainable per `cfg` (AdapterConfig) for the task named `task`; returns the (possibly
    peft-wrapped) model."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "freeze":
        return _freeze(model, cfg.train_last_n_layers)
    if cfg.method not in ("lora", "qlora"):
        raise ConfigError(f"adapter.method={cfg.method!r} is not one of lora, qlora, freeze, full")
    from peft import LoraConfig, TaskType, get_peft_model

    if cfg.method == "qlora":
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ConfigError("adapter.method=qlora needs the base model loaded in 4 bits: load it with "
                              "gemcut.models.load.load_base(..., quantization=adapter.base_quantization())")
        from peft import prepare_model_for_kbit_training

        # Recomputation is train.activation_checkpointing's choice (non-reentrant, so frozen inputs are fine).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    targets = cfg.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    classify = task_named(task).classifier
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, use_dora=cfg.dora,
        task_type=TaskType.SEQ_CLS if classify else TaskType.CAUSAL_LM,
        # A new head has no pre-trained weights to adapt: it trains in full and is saved with the adapter.
        modules_to_save=head_module_names(model) if classify else None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"adapter.target_modules={cfg.target_modules!r} does not fit {type(model).__name__}: {e}") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique tensors (tied weights count once)."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _short(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)


def trainable_summary(model: nn.Module, cfg) -> str:
    """One line for the log, e.g. "LoRA r=16: 4.9M of 139M trainable (3.5%)"."""
    trainable, total = count_parameters(model)
    if cfg.method in ("lora", "qlora"):
        what = f"{'DoRA' if cfg.dora else 'LoRA'} r={cfg.r}"
        if cfg.method == "qlora":
            what = f"Q{what} on a 4-bit {cfg.quant_type} base"
    elif cfg.method == "freeze":
        name, n_blocks, n_last = getattr(model, "_gemcut_freeze", ("blocks", "?", cfg.train_last_n_layers))
        what = f"freeze (last {n_last} of {n_blocks} blocks + head)"
    else:
        what = "full"
    pct = 100.0 * trainable / total if total else 0.0
    return f"{what}: {_short(trainable)} of {_short(total)} trainable ({pct:.1f}%)"


__all__ = ["apply_adapter", "trainable_summary", "count_parameters", "find_blocks", "head_module_names"]
