"""The tuned and the base model of a loaded run, as context managers that evaluation scores in turn.

    python -m pytest -q tests/test_eval_run.py

A LoRA run holds both in one model: the tuned model is the adapter merged into the weights for the duration,
the base model the same model with the adapter switched off (peft `disable_adapter()`), so no second copy is
loaded. Other runs load the base weights once more (`gemcut.models.load.load_base`).
"""

from __future__ import annotations

import contextlib

import torch

from gemcut.config import RunConfig
from gemcut.models.numerics import device_of
from gemcut.tasks import task_named


def is_lora(model) -> bool:
    """Whether `model` is a peft model whose adapter can be switched off."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def tuned_model(loaded):
    """The tuned model for scoring: a LoRA model with its adapter merged into the weights for the duration.

    The outputs are the adapted model's (up to float rounding) without the adapter's two extra matmuls on
    every adapted layer, a fifth of the forward time of SmolLM2 with LoRA on all linear layers. Unmerging
    subtracts the same product again, so the base weights come back equal up to rounding (about 1e-7
    relative in fp32), which is what the base model is then scored with."""
    model = loaded.model
    if not is_lora(model) or not hasattr(model, "merge_adapter"):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


@contextlib.contextmanager
def base_model(loaded, cfg: RunConfig):
    """The base model for comparison: the adapter-disabled model for LoRA runs, else a fresh load of the base."""
    model = loaded.model
    if is_lora(model):
        with model.disable_adapter():
            yield model
        return
    from gemcut.models.load import load_base

    # A classifier's base gets a freshly initialised head; seeding makes that head the same on every evaluation.
    torch.manual_seed(cfg.train.seed)
    with_labels = task_named(loaded.task).head == "classifier"  # a reward model's one output has no label names
    base, _ = load_base(cfg.model, loaded.task, label_names=loaded.labels if with_labels else None)
    base.to(device_of(model))
    base.eval()
    try:
        yield base
    finally:
        del base


def causal_base_of(cfg: RunConfig) -> str | None:
    """Why a classifier-head run's base cannot be prompted as a causal LM, or None when it can: its config's
    `architectures` name a `...ForCausalLM` (an encoder such as MiniLM names none)."""
    from transformers import AutoConfig

    from gemcut.models.resolve import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(cfg.model.name, cfg.model.revision),
                                            trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure to read the config means no causal LM to prompt
        return f"the base model's config could not be read ({type(e).__name__})"
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForCausalLM") for a in architectures):
        return f"the base model {cfg.model.name} is not a causal LM (architectures: {', '.join(architectures) or 'none'})"
    return None


@contextlib.contextmanager
def causal_base_model(cfg: RunConfig, device):
    """(model, tokenizer, template) of a classifier-head run's base loaded as the causal LM it was pre-trained as,
    on `device`, for the prompted baselines; `causal_base_of(cfg)` says whether there is one. Raises ConfigError
    when its tokenizer has no chat template and data.template names none."""
    from gemcut.data.templates import ChatTemplate
    from gemcut.models.load import load_base

    model, tokenizer = load_base(cfg.model, "causal_lm")
    template = ChatTemplate.from_tokenizer(tokenizer, cfg.data.template, cfg.data.system_prompt)
    model.to(device)
    model.eval()
    try:
        yield model, tokenizer, template
    finally:
        del model
