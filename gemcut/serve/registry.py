"""The served models: each `--model` loaded through gemcut.models, named, and served for its task.

    python -m pytest -q tests/test_serve_adapters.py tests/test_serve_tasks.py
    registry = ModelRegistry(settings); registry.add("runs/my-run"); served = registry.get("my-run")

Each `--model` is one of:
- a run folder (or its `final/`): loaded with `gemcut.models.load.load_run`;
- an exported folder: merged safetensors through `gemcut.models.load.load_base`, gemcut's int8 format
  through `gemcut.models.int8.load_int8`;
- any other transformers folder, or a model name resolved by `gemcut.models.resolve` (loaded as a folder).

What a model is served for is its task, the row of the task table (gemcut/tasks.py) named in the
`gemcut_run.json` that every run and export carries: `served_as` chat answers /v1/chat/completions and
/v1/completions; a classifier head (classify, or reward's one score) answers /v1/classify, and
/v1/embeddings when gemcut pools its encoder. Only a folder gemcut did not write, with no run record,
is judged by its config.json: a `...ForSequenceClassification` architecture is a classifier, bare or
masked-LM encoders (`BertModel`, `...ForMaskedLM`) are served for /v1/embeddings only (no task), anything
else is a causal LM. A folder gets the exact speed tricks (gemcut/models/fast/) its run's `train.fast`
names (on for a foreign folder), as `load_run` gives a run folder.

LoRA runs on the same base share one loaded base model: the first becomes a peft model, later ones are
added with `load_adapter` and picked per batch with `set_adapter` (`ServedModel.activate`); the base
itself is served through `disable_adapter()` on the same weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemcut.errors import GemcutError
from gemcut.models.precision import default_device
from gemcut.run_folder import RUN_META, read_run_meta
from gemcut.serve.auth import Principal
from gemcut.serve.errors import APIError
from gemcut.serve.settings import ServeSettings
from gemcut.tasks import Task, task_named

log = logging.getLogger("gemcut.serve")


@dataclass
class ServedModel:
    """One name in /v1/models and everything needed to answer for it."""

    name: str
    task: Task | None  # the task table's row; None: a plain encoder folder, served for /v1/embeddings only
    model: Any  # nn.Module; for adapters, the shared peft model
    tokenizer: Any
    template: Any | None  # has prompt_ids(messages) -> list[int]; None: chat is refused
    context_length: int
    adapter: str | None = None  # peft adapter to activate; None on a peft model means "adapters disabled"
    labels: list[str] | None = None
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    pooling: str | None = None  # embeddings: "cls" or "mean" (gemcut/models/pooling.py); None: no embeddings
    vocabulary: Any = None  # gemcut.serve.structured.Vocabulary, built on first use
    owner: str | None = None  # whose it is (a fine-tuning job's owner); None: every key may call it

    @property
    def generates(self) -> bool:
        """Whether it answers /v1/chat/completions and /v1/completions (its task is served as chat)."""
        return self.task is not None and self.task.served_as == "chat"

    @property
    def classifies(self) -> bool:
        """Whether it answers /v1/classify: a sequence-classification head (a classifier, or a reward model's
        single score, whose probability is then 1)."""
        return self.task is not None and self.task.classifier

    @property
    def kind(self) -> str:
        """What GET /v1/models reports as `task`: causal_lm, classify (classifiers and reward models) or embed."""
        return "causal_lm" if self.generates else "classify" if self.classifies else "embed"

    def eos_ids(self) -> set[int]:
        """Ids that end a completion: the model's and tokenizer's eos plus the template's end-of-turn tokens."""
        from gemcut.generation import default_eos_ids

        ids = set(default_eos_ids(self.model, self.tokenizer))
        if self.template is not None:
            ids.update(self.template.stop_token_ids)
        return ids

    def activate(self):
        """Context in which `self.model` computes this served model (right adapter, or none)."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            if self.adapter is None:
                return self.model.disable_adapter()
            self.model.set_adapter(self.adapter)
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Resolved:
    """Where a lazily served name loads from, and whose it is."""

    source: str
    owner: str | None = None
    checkpoint: str = "final"


def adopt_adapter(shared, trained, name: str) -> None:
    """Add the active adapter of `trained` (a PeftModel) to the `shared` PeftModel as adapter `name`; when they
    are one model (the first of its group), the adapter is renamed."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = trained.active_adapter
    if shared is trained and adapter == name:
        return
    weights = get_peft_model_state_dict(trained, adapter_name=adapter)
    shared.add_adapter(name, trained.peft_config[adapter])
    set_peft_model_state_dict(shared, weights, adapter_name=name)
    if shared is trained:
        shared.set_adapter(name)
        shared.delete_adapter(adapter)
    shared.to(next(shared.parameters()).device)


def context_length(model, tokenizer) -> int:
    """The longest input the model takes: the smaller of its position limit and the tokenizer's (2048 if
    neither says)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    tmax = getattr(tokenizer, "model_max_length", None)
    candidates = [int(x) for x in (n, tmax) if isinstance(x, int) and 0 < x < 10_000_000]
    return min(candidates) if candidates else 2048


def pick_device(name: str) -> torch.device:
    """`ServeSettings.device`: auto is the CUDA GPU when there is one (gemcut/models/precision.py)."""
    return default_device() if name == "auto" else torch.device(name)


def _read_labels(path: Path | str) -> list[str] | None:
    from gemcut.models.load import LABELS

    f = Path(path) / LABELS
    if not f.is_file():
        return None
    data = json.loads(f.read_text(encoding="utf-8"))
    return list(data["labels"] if isinstance(data, dict) else data)


def _is_encoder(architectures: list[str]) -> bool:
    """Bare or masked-LM encoders (served for embeddings only); GPT-2's `...LMHeadModel` is a causal LM."""
    return bool(architectures) and all(a.endswith(("Model", "ForMaskedLM")) and not a.endswith("LMHeadModel")
                                       for a in architectures)


class ModelRegistry:
    """Which models are served and under which names; `add` is thread-safe against the worker's batches."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.device = pick_device(settings.device)
        self.models: dict[str, ServedModel] = {}
        self._groups: dict[str, Any] = {}  # base name -> shared peft model
        # Held by the worker while the model computes, and here while models are added: adding an adapter
        # mutates the shared model.
        self.lock = threading.Lock()
        # Names not loaded at start that may be loaded on first call (the fine-tuning service's models):
        # name -> Resolved, or None when the name is unknown. Set by gemcut/service/app.py.
        self.resolver: Callable[[str], Resolved | None] | None = None
        self._loading = threading.Lock()  # one lazy load at a time: two requests for a new name load it once

    def add(self, source: str, name: str | None = None, *, owner: str | None = None, checkpoint: str = "final") -> ServedModel:
        """Load a run folder, exported folder or model name and serve it under `name` (default: folder name);
        `checkpoint` picks a run's kept checkpoint (`step-40`) instead of its final model."""
        with self.lock:
            served = self._load(source, name, checkpoint)
            served.owner = owner
            if served.name in self.models:
                raise GemcutError(f"two models would both be served as {served.name!r} ({self.models[served.name].source} and {source}); "
                                  "rename one folder")
            self.models[served.name] = served
            log.info("serving %s (%s, context %d) from %s", served.name, served.task.name if served.task else "embeddings only",
                     served.context_length, source)
            return served

    def get(self, name: str | None, principal: Principal | None = None) -> ServedModel:
        """The model served as `name`, loaded now if the resolver knows it; a 400 without a name, a 404 naming
        the served ones for an unknown name or for another owner's model (which is not said to exist)."""
        if not name:
            raise APIError(400, "`model` is required; GET /v1/models lists the served names", param="model", code="missing_model")
        served = self.models.get(name)
        if served is None and self.resolver is not None:
            served = self._load_resolved(name)
        if served is None or (principal is not None and not principal.may_see(served.owner)):
            visible = sorted(m.name for m in self.visible(principal))
            raise APIError(404, f"the model {name!r} does not exist; served models: {', '.join(visible) or 'none'}",
                           param="model", code="model_not_found")
        return served

    def visible(self, principal: Principal | None) -> list[ServedModel]:
        """The loaded models `principal` may call (all of them without a principal)."""
        return [m for m in self.models.values() if principal is None or principal.may_see(m.owner)]

    def _load_resolved(self, name: str) -> ServedModel | None:
        with self._loading:
            if name in self.models:  # another request loaded it while this one waited
                return self.models[name]
            resolved = self.resolver(name)
            if resolved is None:
                return None
            return self.add(resolved.source, name, owner=resolved.owner, checkpoint=resolved.checkpoint)

    # ------------------------------------------------------------------ loading

    def _load(self, source: str, name: str | None, checkpoint: str = "final") -> ServedModel:
        path = Path(source).expanduser()
        if checkpoint != "final":
            return self._load_run(path, name, checkpoint)
        shared = self._groups.get(source) or self._groups.get(str(path.resolve()))
        if shared is not None:
            # The base of adapters already served: the same weights with adapters switched off, no second copy.
            sibling = next(m for m in self.models.values() if m.model is shared)
            return ServedModel(name or path.name or source, task_named("causal_lm"), shared, sibling.tokenizer, sibling.template,
                               sibling.context_length, adapter=None, source=source)
        if path.is_dir() and (path / "final").is_dir():
            return self._load_run(path, name)
        if path.is_dir() and path.name == "final" and (path / RUN_META).is_file():
            return self._load_run(path.parent, name)
        if path.is_dir() and (path / "config.json").is_file():  # an export or any transformers folder
            return self._load_folder(path, name or path.name, str(path))
        from gemcut.models.resolve import resolve_model

        return self._load_folder(resolve_model(source), name or source, source)

    def _load_run(self, run_dir: Path, name: str | None, checkpoint: str = "final") -> ServedModel:
        from peft import PeftModel

        from gemcut.models.load import load_run
        from gemcut.models.pooling import classifier_pooling

        name = name or run_dir.name
        loaded = load_run(run_dir, checkpoint, trust_remote_code=self.settings.trust_remote_code)
        task = task_named(loaded.task)
        chat = task.served_as == "chat"
        labels = list(loaded.labels) if loaded.labels else None
        model, adapter = loaded.model, None
        if isinstance(model, PeftModel) and chat:
            shared = self._groups.get(loaded.base_name)
            final_dir = run_dir / "final"
            if checkpoint != "final":
                # A kept checkpoint holds the adapter inside the trainable state, not as a peft folder: its
                # weights join the shared base as one more named adapter.
                if shared is None:
                    shared = self._adopt_base(model, loaded)
                adopt_adapter(shared, model, name)
            elif shared is None:
                # Rename the adapter to the served name so that later runs cannot collide with "default".
                old = model.active_adapter
                if old != name:
                    model.load_adapter(str(final_dir), adapter_name=name)
                    model.set_adapter(name)
                    model.delete_adapter(old)
                shared = self._adopt_base(model, loaded)
            else:
                # This run's own copy of the base is dropped when `loaded` goes; the shared base serves it.
                shared.load_adapter(str(final_dir), adapter_name=name)
            model, adapter = shared, name
        else:
            model = model.to(self.device).eval()
            if isinstance(model, PeftModel):  # e.g. a LoRA classifier: its own adapter, not shared
                adapter = model.active_adapter
        return ServedModel(name, task, model, loaded.tokenizer, loaded.template if chat else None,
                           context_length(model, loaded.tokenizer), adapter=adapter, labels=labels, source=str(run_dir),
                           pooling=classifier_pooling(model) if task.classifier else None)

    def _adopt_base(self, model, loaded):
        """`model` becomes the shared base of every adapter run on `loaded`'s base model."""
        shared = model.to(self.device).eval()
        self._groups[loaded.base_name] = shared
        base_path = loaded.meta.get("base_path")
        if base_path:
            self._groups[str(Path(base_path).resolve())] = shared
        return shared

    def _folder_task(self, path: Path | str) -> tuple[Task | None, Any, dict]:
        """(task, transformers config, gemcut_run.json or {}) of a model folder: the task its gemcut_run.json
        names (an export carries its run's), else what its config.json's architectures say (a folder gemcut
        did not write)."""
        from transformers import AutoConfig

        # The folder's own Python runs only when the person serving it said so (never left to a prompt).
        config = AutoConfig.from_pretrained(path, trust_remote_code=self.settings.trust_remote_code)
        record = read_run_meta(path)
        if record is not None:
            return task_named(record["task"]), config, record
        architectures = config.architectures or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return task_named("classify"), config, {}
        if _is_encoder(architectures):
            return None, config, {}
        return task_named("causal_lm"), config, {}

    def _load_folder(self, path: Path | str, name: str, source: str) -> ServedModel:
        from gemcut.config import ModelConfig, TrainConfig
        from gemcut.models.fast import apply_fast
        from gemcut.models.load import load_base
        from gemcut.models.pooling import classifier_pooling, prepare_classifier

        task, config, record = self._folder_task(path)
        if task is None:
            return self._load_encoder(path, name, source)
        labels = None
        if task.classifier:
            labels = _read_labels(path) or [config.id2label[i] for i in sorted(config.id2label)] or None
        if (Path(path) / "quantize_config.json").is_file():
            from gemcut.models.int8 import load_int8

            model, tokenizer = load_int8(path)
            if task.classifier:
                prepare_classifier(model, "auto", path)  # the export recorded its pooling in config.json
        else:
            # float32 on the CPU, where bf16 is emulated and slow unless the CPU has bf16 instructions
            # (gemcut/models/precision.py); a GPU keeps the folder's own dtype.
            dtype = "float32" if self.device.type == "cpu" else "auto"
            model_config = ModelConfig(name=str(path), dtype=dtype, trust_remote_code=self.settings.trust_remote_code)
            model, tokenizer = load_base(model_config, task.name, label_names=labels)
        # The exact speed tricks (gemcut/models/fast/) as the run had them (on for a folder gemcut did not
        # write), the same logits faster; as load_run does for a run folder.
        apply_fast(model, task, TrainConfig(fast=record.get("config", {}).get("train", {}).get("fast", True), fast_dropout=False))
        model = model.to(self.device).eval()
        template = None if task.classifier else self._folder_template(path, tokenizer, name)
        return ServedModel(name, task, model, tokenizer, template, context_length(model, tokenizer), labels=labels, source=source,
                           pooling=classifier_pooling(model) if task.classifier else None)

    @staticmethod
    def _folder_template(path: Path | str, tokenizer, name: str):
        """An export's template.json (the run's template); any other folder: the tokenizer's own; None without one."""
        from gemcut.data.templates import TEMPLATE_JSON, ChatTemplate

        try:
            return ChatTemplate.load(path, tokenizer) if (Path(path) / TEMPLATE_JSON).is_file() else ChatTemplate.from_tokenizer(tokenizer)
        except GemcutError:
            log.warning("%s: the tokenizer has no chat template; /v1/chat/completions is refused, /v1/completions works", name)
            return None

    def _load_encoder(self, path: Path | str, name: str, source: str) -> ServedModel:
        """A plain encoder folder, for /v1/embeddings: pooled as its checkpoint says (sentence-transformers'
        modules.json, or a recorded classifier_pooling), else by the mean of its tokens."""
        from gemcut.models.load import load_encoder
        from gemcut.models.pooling import checkpoint_pooling

        model, tokenizer = load_encoder(path, dtype=torch.float32 if self.device.type == "cpu" else "auto",
                                        trust_remote_code=self.settings.trust_remote_code)
        model = model.to(self.device).eval()
        return ServedModel(name, None, model, tokenizer, None, context_length(model, tokenizer), source=source,
                           pooling=checkpoint_pooling(model, path) or "mean")
