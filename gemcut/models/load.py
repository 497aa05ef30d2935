"""Load a base model for training, save a finished run, and load any run back: the one way to do each.

    python -m pytest -q tests/test_models_load.py

- `load_base(cfg.model, task, quantization=cfg.adapter.base_quantization())`: resolve the name
  (gemcut/models/resolve.py), load the tokenizer and the model of the task's head (the task table,
  gemcut/tasks.py; `model_class`): AutoModelForCausalLM, or AutoModelForSequenceClassification with a new
  head of `num_labels` classes (classify) or 1 score (reward). Safetensors only; remote code only when
  `model.trust_remote_code`; decoders get a pad token (their EOS) because batches are padded. The attention
  kernel is `resolve_attn_implementation`'s; `quantization` (adapter.method=qlora) loads the base in 4 bits
  through bitsandbytes on this process's GPU, and is refused with the fix where CUDA or bitsandbytes is missing.
- `save_final(model, tokenizer, template, out_dir, labels=..., meta=...)`: `final/` holds the adapter
  (peft format) or the full model, the tokenizer (its chat template set to the one used in training),
  `template.json` + `chat_template.jinja`, `labels.json`, and `gemcut_run.json` (base model, task, adapter
  method, resolved config; gemcut/run_folder.py `run_meta`). Written to a temporary folder and renamed into place.
- `load_run(run_dir, checkpoint, trust_remote_code=False)`: `final`, `best`, `last` or `step-N`. For an
  adapter run it loads the base model then the adapter; for a checkpoint (which holds only the trainable
  weights, see gemcut/run_folder.py) it rebuilds base + adapter from the checkpoint's `config.yaml`
  and copies the saved weights in. A QLoRA run loads the same way, its adapter on the unquantized base (the
  original weights, not their 4-bit rounding). Eval, export and serve all load runs through this. Whether the folder's
  own Python may run is the caller's choice, never the folder's (docs/security.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemcut.errors import ConfigError, GemcutError
from gemcut.models.resolve import resolve_model
from gemcut.run_folder import (
    RUN_META,
    WEIGHTS,
    find_checkpoint,
    load_trainable,
    read_config,
    read_run_meta,
    write_run_meta,
)
from gemcut.tasks import Task, resolve_task, task_named
from gemcut.version import __version__

LABELS = "labels.json"
TRUST_HINT = "pass --trust-remote-code (trust_remote_code: true in a serve settings file) only if you trust whoever made it"

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A run loaded for inference: the model in eval mode and everything needed to prompt it."""

    model: Any
    tokenizer: Any
    template: Any  # ChatTemplate, or None for classifiers whose tokenizer has no chat template
    labels: list[str] | None
    task: str
    config: dict
    base_name: str
    path: Path | None = None
    meta: dict = field(default_factory=dict)
    value_head: Any = None  # PPO runs: the value head trained beside the policy (gemcut/models/value_head.py)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[name]


def model_class(task: Task):
    """The transformers auto class of the task's head: sequence classification for a classifier or scorer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task.classifier else AutoModelForCausalLM


def load_tokenizer(source, *, trust_remote_code: bool = False, revision: str | None = None):
    """The model's tokenizer, with a pad token (decoders pad with their EOS; labels mask the padding)."""
    from transformers import AutoTokenizer

    kwargs = {"revision": revision} if isinstance(source, str) and revision else {}
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {source} has neither a pad nor an EOS token; batches cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_encoder(source, *, dtype="auto", trust_remote_code: bool = False):
    """(model, tokenizer) of a plain encoder folder, without a task head (what /v1/embeddings serves):
    safetensors only, remote code only when the caller allows it."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(source, trust_remote_code=trust_remote_code)


def dropout_overrides(source, p: float, *, trust_remote_code: bool = False, revision: str | None = None) -> dict[str, float]:
    """Config fields of `source` that hold a dropout probability, each set to `p`, as `from_pretrained` kwargs.

    Architectures name them differently (BERT `hidden_dropout_prob`, Llama `attention_dropout`, GPT-2
    `resid_pdrop`), so they are found by name. A classifier's `classifier_dropout` is None when it follows
    the hidden dropout; it is set too, so the head does what the body does."""
    from transformers import AutoConfig

    kwargs = {"revision": revision} if isinstance(source, str) and revision else {}
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    fields = {k: v for k, v in config.to_dict().items() if "dropout" in k or k.endswith("_pdrop")}
    # Numbers only (some configs write 0 for 0.0); a flag such as `use_dropout: true` is not a probability.
    return {k: p for k, v in fields.items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


FLASH_ATTENTION_FIX = ("install flash-attn on a CUDA machine (pip install flash-attn --no-build-isolation), "
                       "or set model.attn_implementation=auto (sdpa where flash attention cannot run)")
QLORA_FIX = "install bitsandbytes on a CUDA machine (pip install bitsandbytes), or use adapter.method=lora"


def flash_attention_missing() -> str | None:
    """What flash_attention_2 lacks on this machine (a CUDA GPU, the flash_attn package), or None."""
    import importlib.util

    import torch

    lacks = [what for what, missing in (
        ("no CUDA GPU (torch.cuda.is_available() is False)", not torch.cuda.is_available()),
        ("the flash_attn package is not installed", importlib.util.find_spec("flash_attn") is None),
    ) if missing]
    return " and ".join(lacks) or None


def qlora_missing() -> str | None:
    """What a 4-bit QLoRA base lacks on this machine (a CUDA GPU with bf16, bitsandbytes), or None."""
    import importlib.util

    import torch

    lacks = []
    if not torch.cuda.is_available():
        lacks.append("no CUDA GPU (torch.cuda.is_available() is False)")
    elif not torch.cuda.is_bf16_supported():
        lacks.append(f"{torch.cuda.get_device_name()} does not compute in bf16 (QLoRA's compute dtype; Ampere or newer)")
    if importlib.util.find_spec("bitsandbytes") is None:
        lacks.append("the bitsandbytes package is not installed")
    return " and ".join(lacks) or None


def resolve_attn_implementation(requested: str, dtype, *, task: Task, quantized: bool = False) -> str:
    """The attention kernel a model is loaded with, for `model.attn_implementation` = `requested`.

    auto is flash_attention_2 only where it runs and pays: a CUDA GPU, the flash_attn package, a decoder
    (classifiers keep sdpa: their pooling and padding-free paths read the attention mask, gemcut/models/pooling.py)
    and half-precision weights (`dtype` bf16/fp16, or a 4-bit base computing in bf16); else sdpa. An explicit
    flash_attention_2 where it cannot run is a ConfigError naming what is missing and the fix."""
    import torch

    if requested == "auto":
        half = quantized or dtype in (torch.bfloat16, torch.float16)
        return "flash_attention_2" if half and not task.classifier and flash_attention_missing() is None else "sdpa"
    if requested == "flash_attention_2":
        missing = flash_attention_missing()
        if missing:
            raise ConfigError(f"model.attn_implementation=flash_attention_2 cannot run here: {missing}; {FLASH_ATTENTION_FIX}")
    return requested


def _checkpoint_dtype(source, cfg):
    """The dtype `cfg.dtype` loads the weights in; for "auto", the one the checkpoint's config.json names."""
    if cfg.dtype != "auto":
        return _torch_dtype(cfg.dtype)
    from transformers import AutoConfig

    kwargs = {"revision": cfg.revision} if isinstance(source, str) and cfg.revision else {}
    return getattr(AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs), "dtype", None)


def four_bit_kwargs(quantization: dict) -> dict[str, Any]:
    """`from_pretrained` kwargs that load the base in 4 bits (QLoRA, Dettmers et al., 2023, arXiv:2305.14314):
    bitsandbytes NF4 (or FP4) weights, optionally double-quantized scales, bf16 compute. Refused with the fix
    where CUDA or bitsandbytes is missing."""
    missing = qlora_missing()
    if missing:
        raise ConfigError(f"adapter.method=qlora cannot run here: {missing}. QLoRA loads the base model in 4 bits "
                          f"through bitsandbytes, which needs a CUDA GPU; {QLORA_FIX}")
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization["quant_type"],
                                bnb_4bit_use_double_quant=quantization["double_quant"],
                                bnb_4bit_compute_dtype=torch.bfloat16)
    # bitsandbytes quantizes the weights as they reach the GPU: each process loads onto its own
    # (LOCAL_RANK under torchrun and accelerate launch, 0 for one process).
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def load_base(cfg, task: str, num_labels: int | None = None, label_names: list[str] | None = None,
              quantization: dict | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the pre-trained model named by `cfg` (ModelConfig), ready for the task named `task`.

    For classify, the head has `num_labels` outputs (or len(label_names)) and id2label/label2id are set; for
    reward it has one output. The new head is initialised from torch's global RNG: seed before calling.
    `quantization` is `AdapterConfig.base_quantization()`: None loads the checkpoint's weights as they are,
    {"bits": 4, ...} loads them in 4 bits for QLoRA (`four_bit_kwargs`), then `apply_adapter` adds the LoRA.
    """
    spec = task_named(task)
    source = resolve_model(cfg.name, cfg.revision)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    kwargs: dict[str, Any] = {
        "dtype": _torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code, "use_safetensors": True,
        "attn_implementation": resolve_attn_implementation(cfg.attn_implementation, _checkpoint_dtype(source, cfg),
                                                           task=spec, quantized=quantization is not None),
    }
    if quantization is not None:
        kwargs |= four_bit_kwargs(quantization)
    if isinstance(source, str) and cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.dropout is not None:
        kwargs |= dropout_overrides(source, cfg.dropout, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if spec.classifier:
        if spec.head == "scorer":
            label_names = ["reward"]
        elif label_names is None:
            if num_labels is None:
                raise ConfigError("a classifier needs its labels: pass label_names (or num_labels)")
            label_names = [f"LABEL_{i}" for i in range(num_labels)]
        if num_labels is not None and spec.head != "scorer" and num_labels != len(label_names):
            raise ConfigError(f"num_labels={num_labels} but {len(label_names)} label names were given")
        kwargs |= {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
            # A folder that is already a classifier with another label count gets a fresh head.
            "ignore_mismatched_sizes": True,
        }
    try:
        model, loading = model_class(spec).from_pretrained(source, output_loading_info=True, **kwargs)
    except OSError as e:
        raise GemcutError(f"model {cfg.name!r} ({source}) could not be loaded with safetensors: {e}") from None
    _report_loading(model, loading, spec, cfg.name)
    if model.config.pad_token_id is None:
        # Decoder classifiers find each row's last real token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.classifier:
        from gemcut.models.pooling import prepare_classifier

        prepare_classifier(model, cfg.pooling, source)
    return model, tokenizer


def _report_loading(model, loading: dict, task: Task, name: str) -> None:
    """One line for each thing transformers' load-report table says: a classifier's new head is expected
    (info); other weights missing from the checkpoint are a warning; unused checkpoint weights are info."""
    mismatched = [k[0] if isinstance(k, tuple) else k for k in loading.get("mismatched_keys", ())]
    fresh = sorted({*loading.get("missing_keys", ()), *mismatched})
    head = [k for k in fresh if task.classifier and k.split(".")[0] in ("score", "classifier")]
    others = [k for k in fresh if k not in head]
    unused = sorted(loading.get("unexpected_keys", ()))
    if head:
        n = model.config.num_labels
        log.info("%s: new %s head (%d output%s), initialised from the seed", name, head[0].rsplit(".", 1)[0], n, "" if n == 1 else "s")
    if others:
        log.warning("%s: %d weights missing from the checkpoint and initialised at random: %s", name, len(others),
                    ", ".join(others[:5]))
    if unused:
        log.info("%s: %d checkpoint weights not used by %s: %s", name, len(unused), type(model).__name__, ", ".join(unused[:5]))


# ---------------------------------------------------------------- saving


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_final(model, tokenizer, template, out_dir: str | Path, *, labels: list[str] | None = None, meta: dict) -> Path:
    """Write the finished run into `out_dir` (see the module docstring); returns `out_dir`.

    `meta` holds at least `task` and `config` (the resolved run config as a dict; gemcut.run_folder.run_meta
    builds it).
    """
    if "task" not in meta or "config" not in meta:
        raise ValueError("save_final: meta needs 'task' and 'config' (use gemcut.run_folder.run_meta)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fmt = "adapter" if _is_peft(model) else "full"
        model.save_pretrained(tmp)
        if template is not None:
            # The folder's tokenizer carries the training template, so plain transformers (and vLLM) prompt
            # the model exactly as it was trained.
            tokenizer.chat_template = template.source
        tokenizer.save_pretrained(tmp)
        if template is not None:
            template.save(tmp)
        if labels is not None:
            (tmp / LABELS).write_text(json.dumps(list(labels), indent=2))
        write_run_meta(tmp, {**meta, "format": fmt, "labels": list(labels) if labels is not None else meta.get("labels"),
                             "gemcut_version": __version__})
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------- loading runs


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _infer_task(config: dict) -> str:
    """The task of a checkpoint whose run left no gemcut_run.json: resolved from its config as the run did."""
    return resolve_task(config.get("objective", {}).get("kind", "auto"), config.get("data", {}).get("kind")).name


def _head_size(weights_file: Path) -> int | None:
    """Output rows of the classification head in a checkpoint's weights (its label count)."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".weight") and any(h in key for h in ("classifier.", "score.")) and "lora_" not in key:
                return int(f.get_slice(key).get_shape()[0])
    return None


def _with_pooling_default(model_section: dict) -> dict:
    """A run's model section; runs saved before `model.pooling` existed read the first token."""
    return {"pooling": "cls", **model_section}


def code_requests(folder: str | Path) -> list[str]:
    """The Python a model folder asks transformers to import: `auto_map` entries of its config.json and
    tokenizer_config.json, as "file: class" strings (empty for an ordinary folder)."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((Path(folder) / name).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue  # no file or not a JSON object: nothing asked for here (loading reports real damage)
        refs = auto_map.values() if isinstance(auto_map, dict) else auto_map
        for ref in refs:
            for one in ref if isinstance(ref, list) else [ref]:
                if isinstance(one, str):
                    found.append(f"{name}: {one}")
    return found


def run_model_config(model_section: dict, folder: Path, trust_remote_code: bool):
    """The ModelConfig that loads a saved run: the run's own model section, except that remote code is
    allowed only by the person loading it (`trust_remote_code`), never by the folder; a folder that asks
    for its code to run is named in a warning."""
    from gemcut.config import ModelConfig

    section = _with_pooling_default(model_section)
    base = Path(str(section.get("name", "")))
    asked = code_requests(folder) + (code_requests(base) if base.is_dir() else [])
    if section.get("trust_remote_code"):
        asked.append("its config sets model.trust_remote_code: true")
    if asked and not trust_remote_code:
        log.warning("%s asks to run Python code from its files (%s); not run: it is loaded with transformers' own "
                    "classes. To run that code, %s.", folder, "; ".join(asked), TRUST_HINT)
    return ModelConfig(**{**section, "trust_remote_code": trust_remote_code})


def load_run(run_dir: str | Path, checkpoint: str = "final", *, trust_remote_code: bool = False) -> LoadedRun:
    """Load a run for inference (eval mode, no gradients needed); see the module docstring.

    `trust_remote_code` lets Python files in the run folder (or its base model folder) run; it is the
    caller's decision, whatever the folder's own config says.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GemcutError(f"{run_dir}: no such run folder")
    try:
        return _load_run(run_dir, checkpoint, trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        # transformers has no class of its own for this model and remote code is off.
        raise GemcutError(f"{run_dir}: the model needs Python code shipped in its folder, which gemcut does not run "
                          f"unless you say so; {TRUST_HINT}") from None


def _load_run(run_dir: Path, checkpoint: str, trust_remote_code: bool) -> LoadedRun:
    from gemcut.config import AdapterConfig
    from gemcut.data.templates import TEMPLATE_JSON, ChatTemplate
    from gemcut.models.adapters import apply_adapter

    if checkpoint == "final":
        where = run_dir / "final"
        meta = read_run_meta(where)
        if meta is None:
            raise GemcutError(f"{where}: no {RUN_META}; the run has not finished (try checkpoint='last')")
        config = meta["config"]
        task = meta["task"]
        spec = task_named(task)
        labels = meta.get("labels") or _read_json(where / LABELS)
        model_cfg = run_model_config(config["model"], where, trust_remote_code)
        if meta.get("format") == "adapter":
            from peft import PeftModel

            base, _ = load_base(model_cfg, task, label_names=labels if spec.head == "classifier" else None)
            model = PeftModel.from_pretrained(base, where)
        else:
            attn = resolve_attn_implementation(model_cfg.attn_implementation, _checkpoint_dtype(where, model_cfg), task=spec)
            kwargs: dict[str, Any] = {"dtype": _torch_dtype(model_cfg.dtype), "use_safetensors": True,
                                      "attn_implementation": attn, "trust_remote_code": model_cfg.trust_remote_code}
            model = model_class(spec).from_pretrained(where, **kwargs)
            if spec.classifier:
                from gemcut.models.pooling import prepare_classifier

                prepare_classifier(model, model_cfg.pooling, where)
        tokenizer = load_tokenizer(where, trust_remote_code=model_cfg.trust_remote_code)
        template = ChatTemplate.load(where, tokenizer) if (where / TEMPLATE_JSON).is_file() else None
        value_head = None
        if spec.value_head:
            from gemcut.models.numerics import unwrap_peft
            from gemcut.models.value_head import load_value_head

            value_head = load_value_head(where, unwrap_peft(model).config.hidden_size)
    else:
        where = find_checkpoint(run_dir, checkpoint)
        config = read_config(where)  # a damaged file names the checkpoint and the problem
        meta = read_run_meta(where) or read_run_meta(run_dir) or read_run_meta(run_dir / "final") or {}
        task = meta.get("task") or _infer_task(config)
        spec = task_named(task)
        labels = meta.get("labels") or _read_json(run_dir / LABELS) or config.get("data", {}).get("labels")
        num_labels = None
        if spec.head == "classifier" and labels is None:
            num_labels = _head_size(where / WEIGHTS)
            if num_labels is None:
                raise GemcutError(f"{where}: cannot tell the classifier's labels (no labels.json, no data.labels, "
                                  "no head weights in model.safetensors)")
        model_cfg = run_model_config(config["model"], where, trust_remote_code)
        model, tokenizer = load_base(model_cfg, task, num_labels=num_labels,
                                     label_names=labels if spec.head == "classifier" else None)
        if spec.head == "classifier" and labels is None:
            labels = [model.config.id2label[i] for i in range(num_labels)]
        # The same wrapping training used, so the checkpoint's parameter names line up; a QLoRA run's adapter
        # goes on the unquantized base (the same names: peft wraps the 4-bit and the plain linears alike).
        adapter = AdapterConfig(**config["adapter"])
        if adapter.method == "qlora":
            adapter = adapter.model_copy(update={"method": "lora"})
        model = apply_adapter(model, adapter, task)
        value_head = None
        if spec.value_head:  # PPO's checkpoints hold the policy's weights and `value_head.*`
            from gemcut.models.value_head import PolicyWithValueHead

            trained = PolicyWithValueHead(model)
            load_trainable(trained, where)
            value_head = trained.value_head
        else:
            load_trainable(model, where)
        template = None
        for candidate in (where, run_dir / "final", run_dir):
            if (candidate / TEMPLATE_JSON).is_file():
                template = ChatTemplate.load(candidate, tokenizer)
                break
        if template is None and not spec.classifier:
            data = config.get("data", {})
            template = ChatTemplate.from_tokenizer(tokenizer, data.get("template"), data.get("system_prompt"))
    # Evaluated and served with the run's own train.fast (the same logits, faster); dropout is off at inference.
    from gemcut.config import TrainConfig
    from gemcut.models.fast import apply_fast

    apply_fast(model, spec, TrainConfig(fast=config.get("train", {}).get("fast", True), fast_dropout=False))
    model.eval()
    for module in (model, value_head):
        for p in module.parameters() if module is not None else ():
            p.requires_grad_(False)
    base = meta.get("base_model") or config.get("model", {}).get("name", "?")
    return LoadedRun(model=model, tokenizer=tokenizer, template=template, labels=labels, task=task,
                     config=config, base_name=base, path=where, meta=meta, value_head=value_head)

