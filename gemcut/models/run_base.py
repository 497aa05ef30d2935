"""A finished run as the base model of the next run: `model.name: runs/sft1` (SFT -> DPO, SFT -> reward).

    gemcut train examples/sft_chatterbot.yaml output.name=sft1
    gemcut train examples/dpo_chatterbot.yaml model.name=runs/sft1

`resolve_model` sends a run folder here, with itself as `resolve_base` (this module does not import
gemcut/models/resolve.py, which imports it), and gets back a transformers folder holding the run's weights:
- a full or freeze run: its `final/` (already a whole model, tokenizer with the run's chat template);
- a LoRA run: the adapter merged into its own base, saved once as `<run>/merged/` (float32 safetensors,
  tokenizer and template from `final/`). The merge is remade when `final/` changes (the adapter file's
  hash is stamped in the folder), and written under a temporary name then renamed, so a crash never leaves
  a half-written base that looks complete.

The next run trains a fresh adapter on top, so a DPO run's reference (its adapter switched off) is the SFT
model itself. The run's base may itself be a run: chains resolve one link at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from gemcut.errors import ModelNotFoundError
from gemcut.run_folder import RUN_META

MERGED = "merged"
STAMP = "gemcut_merged_from.json"  # written last inside merged/: marks a finished merge of this adapter
CAUSAL_TASKS = ("causal_lm", "dpo", "grpo", "ppo")

log = logging.getLogger(__name__)


def is_run_folder(path: Path) -> bool:
    """A folder `gemcut train` made: it has config.yaml (and no config.json of a plain model folder)."""
    return (path / "config.yaml").is_file() and not (path / "config.json").is_file()


def _adapter_hash(final: Path) -> str:
    digest = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        digest.update((final / name).read_bytes())
    return digest.hexdigest()


def run_weights(run_dir: Path, resolve_base: Callable[[str, str | None], Path | str]) -> Path:
    """The transformers folder holding a finished run's weights (see the module docstring). A LoRA run's own
    base is found with `resolve_base(name, revision)` (gemcut.models.resolve.resolve_model)."""
    final = run_dir / "final"
    meta_file = final / RUN_META
    if not meta_file.is_file():
        raise ModelNotFoundError(
            f"{run_dir}: this run has not finished (no final/{RUN_META}), so it has no weights to start from; "
            f"finish it with `gemcut train {run_dir / 'config.yaml'} --resume`, or name another model")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("format") != "adapter":
        return final
    if meta.get("task") not in CAUSAL_TASKS:
        raise ModelNotFoundError(
            f"{run_dir}: a {meta.get('task')} run with a LoRA adapter cannot be the base of another run (its head and "
            "adapter do not merge into a language model); start from its base model, or export it first")
    merged = run_dir / MERGED
    stamp = {"adapter_sha256": _adapter_hash(final)}
    try:
        if json.loads((merged / STAMP).read_text(encoding="utf-8")) == stamp:
            return merged
    except (OSError, ValueError):
        pass  # absent or left by an older final/: merge again
    log.info("%s: merging its LoRA adapter into its base once, into %s (the next run starts from these weights)", run_dir, merged)
    _merge(final, meta, merged, stamp, resolve_base(meta["config"]["model"]["name"], meta["config"]["model"].get("revision")))
    return merged


def _merge(final: Path, meta: dict, out: Path, stamp: dict, source: Path | str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Only the base's own weights are read here; no code from either folder runs.
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(base, final).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(final)  # carries the chat template the run trained with
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in ("template.json", "chat_template.jinja", "generation_config.json"):
            if (final / name).is_file() and not (tmp / name).is_file():
                shutil.copy2(final / name, tmp / name)
        (tmp / STAMP).write_text(json.dumps(stamp), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
