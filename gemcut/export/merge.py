"""Export a run into folders other tools load: merged safetensors, the adapter alone, or int8 for CPU.

    gemcut export runs/my-run --merge --dtype bf16 --out exported/my-run
    gemcut export runs/my-run --no-merge                      # peft adapter (what vLLM loads as a LoRA)
    gemcut export runs/my-run --merge --quantize int8         # gemcut-int8 (see gemcut/models/int8.py)

A merged folder is a plain transformers model: `AutoModelForCausalLM.from_pretrained(out)` loads it, its
tokenizer carries the run's chat template (so `apply_chat_template` renders exactly what training saw),
and `generation_config.json` stops on the template's end-of-turn tokens. The run's `template.json`,
`chat_template.jinja`, `labels.json` and `gemcut_run.json` are copied alongside, and `export.json` records
what was exported and the sizes (for int8 also speed and quality before and after, see report.py, which
this module imports and which never imports it back).
An encoder classifier's pooling is in config.json (`classifier_pooling`) and export.json; a mean-pooled one
(gemcut/models/pooling.py) gets a warning there, since plain transformers reads the first token instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch

from gemcut.errors import GemcutError
from gemcut.export.report import compare_int8, folder_bytes, weight_bytes
from gemcut.models.pooling import classifier_pooling
from gemcut.tasks import task_named

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# config.json records `classifier_pooling: mean`, which gemcut reads and plain transformers ignores.
MEAN_POOLING_WARNING = ("this classifier pools the mean of its tokens (model.pooling); gemcut serve and gemcut.load_run "
                        "read it that way, plain AutoModelForSequenceClassification reads the first token and gives "
                        "other predictions")
SIDE_FILES = ("template.json", "chat_template.jinja", "labels.json", "gemcut_run.json")


def default_out_dir(run_dir: Path, merge: bool, dtype: str, quantize: str | None) -> Path:
    kind = "int8" if quantize else (f"merged-{dtype}" if merge else "adapter")
    return Path(run_dir) / "export" / kind


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, merge: bool = True,
               dtype: Literal["fp32", "bf16"] = "fp32", quantize: Literal["int8"] | None = None,
               report: bool = True, trust_remote_code: bool = False) -> Path:
    """Export the run's `final/` model; returns the output folder.

    Args:
        run_dir: a run folder (with final/).
        out_dir: where to write; default `<run_dir>/export/<merged-fp32|merged-bf16|adapter|int8>`.
        merge: fold LoRA weights into the base and save a full model; False saves the adapter alone.
        dtype: weights dtype of a merged export.
        quantize: "int8" writes gemcut's int8 format for CPU serving (needs merge; dtype is ignored).
        report: for int8, measure size, speed and quality against the float model (a few seconds).
        trust_remote_code: let Python files shipped in the run (or base) folder run; the folder cannot.
    """
    from peft import PeftModel

    from gemcut.models.load import load_run

    run_dir = Path(run_dir)
    if dtype not in DTYPES:
        raise GemcutError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize not in (None, "int8"):
        raise GemcutError(f"--quantize {quantize!r} is not supported; use int8 or leave it out")
    if quantize and not merge:
        raise GemcutError("--quantize int8 needs --merge: quantization works on the full merged weights")
    loaded = load_run(run_dir, trust_remote_code=trust_remote_code)
    final = run_dir / "final"
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dir, merge, dtype, quantize)
    if out.exists() and any(out.iterdir()):
        raise GemcutError(f"{out} exists and is not empty; pass another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    is_peft = isinstance(model, PeftModel)
    info: dict = {"source_run": str(run_dir.resolve()), "base_model": loaded.base_name, "task": loaded.task,
                  "merge": merge, "dtype": dtype if not quantize else "int8", "quantize": quantize}
    pooling = classifier_pooling(model)
    if pooling is not None:
        info["pooling"] = pooling
        if pooling == "mean":
            info["warning"] = MEAN_POOLING_WARNING

    if not merge:
        if not is_peft:
            raise GemcutError(f"{run_dir}: this run trained the whole model (no LoRA adapter), so there is no adapter to export; use --merge")
        model.save_pretrained(out, safe_serialization=True)
        info["format"] = "peft-adapter"
    else:
        if is_peft:
            model = model.merge_and_unload()
        model = model.float().eval()
        if quantize == "int8":
            from gemcut.models.int8 import save_int8

            save_int8(model, out)
            info["format"] = "gemcut-int8"
        else:
            model.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
            info["format"] = "transformers-safetensors"

    if template is not None:
        # The run's template becomes the tokenizer's own, so plain transformers renders prompts the same way.
        tokenizer.chat_template = template.source
    tokenizer.save_pretrained(out)
    _save_generation_config(model, template, out)
    for name in SIDE_FILES:
        if (final / name).is_file():
            shutil.copy2(final / name, out / name)
    info["bytes"] = {"weights": weight_bytes(out), "folder": folder_bytes(out)}
    # The report measures perplexity and generation speed: a chat model's, not a classifier's or a scorer's.
    if quantize == "int8" and report and task_named(loaded.task).served_as == "chat":
        info["int8_report"] = compare_int8(model, out, tokenizer)
    (out / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out


def _save_generation_config(model, template, out: Path) -> None:
    from transformers import GenerationConfig

    if not hasattr(model, "generation_config") and not hasattr(getattr(model, "base_model", None), "generation_config"):
        return
    cfg = getattr(model, "generation_config", None) or GenerationConfig()
    if not isinstance(cfg, GenerationConfig):
        cfg = GenerationConfig()
    eos = set()
    if template is not None:
        eos.update(template.stop_token_ids)
    base_eos = cfg.eos_token_id
    if isinstance(base_eos, int):
        eos.add(base_eos)
    elif base_eos:
        eos.update(base_eos)
    if eos:
        cfg.eos_token_id = sorted(eos)
    cfg.save_pretrained(out)
