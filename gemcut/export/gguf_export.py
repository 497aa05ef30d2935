"""`gemcut export RUN --format gguf`: a run as GGUF for llama.cpp and Ollama, with a Modelfile beside it.

    gemcut export runs/my-run --format gguf --quantize q8_0        # runs/my-run/export/gguf-q8_0/model.gguf
    gemcut export runs/my-run --format gguf --no-merge             # base.gguf + adapter.gguf (llama.cpp --lora)
    llama-cli -m runs/my-run/export/gguf-q8_0/model.gguf -cnv      # the run's chat template is in the file
    ollama create my-run -f runs/my-run/export/gguf-q8_0/Modelfile

Merged (default): LoRA folded into the base, written by gguf_writer.py as `model.gguf` in the chosen type.
`--no-merge`: the base model as `base.gguf` (in the chosen type) and the adapter as `adapter.gguf` (float32,
gguf_lora.py), which llama.cpp applies at load time (`--lora`, llama-cpp-python `lora_path`, Ollama
ADAPTER). A `Modelfile` (ollama.py) is written when the run's chat template has an exact Go translation;
when not, export.json says why (`modelfile_error`) and the GGUF is still written. export.json records the
files, their sizes and tensor types; the run's template.json, chat_template.jinja and gemcut_run.json are
copied alongside as for every export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gemcut.errors import GemcutError
from gemcut.export.gguf_lora import write_lora_gguf
from gemcut.export.gguf_writer import QUANTIZE_TYPES, write_model_gguf
from gemcut.export.merge import SIDE_FILES
from gemcut.export.ollama import ModelfileError, modelfile_text

MODEL_FILE, BASE_FILE, ADAPTER_FILE, MODELFILE = "model.gguf", "base.gguf", "adapter.gguf", "Modelfile"
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9}  # gemcut chat's defaults, unless the run's generation config says otherwise
OLLAMA_MAX_CTX = 8192  # Ollama allocates the whole context up front: a long model context would cost memory


def default_gguf_dir(run_dir: Path, merge: bool, quantize: str) -> Path:
    return Path(run_dir) / "export" / (f"gguf-{quantize}" if merge else f"gguf-adapter-{quantize}")


def ollama_parameters(model) -> dict:
    """Default sampling for the Modelfile: the model's generation config where it samples, else gemcut chat's."""
    params = dict(CHAT_DEFAULTS)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "do_sample", False):
        for key in ("temperature", "top_p", "top_k"):
            if getattr(gen, key, None) is not None:
                params[key] = getattr(gen, key)
    params["num_ctx"] = min(int(model.config.max_position_embeddings), OLLAMA_MAX_CTX)
    return params


def turn_end_id(template) -> int | None:
    """The end-of-turn token the template writes after an assistant message (<|im_end|> in ChatML)."""
    mark = "GemcutAnswerMark"
    text = template.render_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}])
    if mark not in text:  # a template that rewrites contents: no turn end to point at
        return None
    tail = template.tokenizer(text[text.index(mark) + len(mark):], add_special_tokens=False)["input_ids"]
    return next((i for i in tail if i in template.stop_token_ids), None)


def export_gguf(run_dir: str | Path, out_dir: str | Path | None = None, *, quantize: str = "f16", merge: bool = True,
                trust_remote_code: bool = False) -> Path:
    """Export the run's `final/` model as GGUF (+ Modelfile, export.json); returns the output folder.

    Args:
        run_dir: a run folder (with final/) of a Llama-architecture chat model.
        out_dir: default `<run_dir>/export/gguf-<quantize>` (merged) or `gguf-adapter-<quantize>`.
        quantize: type of the model's matrices: f16, bf16, q8_0 or q4_0 (an adapter is always float32).
        merge: fold the LoRA adapter into the model (one file); False writes base.gguf and adapter.gguf.
        trust_remote_code: as for `gemcut.models.load.load_run`.
    """
    from peft import PeftModel

    from gemcut.models.load import load_run
    from gemcut.tasks import task_named

    run_dir = Path(run_dir)
    if quantize not in QUANTIZE_TYPES:
        raise GemcutError(f"--quantize {quantize!r} is not a GGUF type; use one of {', '.join(QUANTIZE_TYPES)}")
    loaded = load_run(run_dir, trust_remote_code=trust_remote_code)
    if task_named(loaded.task).served_as != "chat":
        raise GemcutError(f"{run_dir}: GGUF export is for generative (chat) models; this run is a {loaded.task} model. "
                          "Use --format transformers")
    model, template = loaded.model, loaded.template
    is_peft = isinstance(model, PeftModel)
    if not merge and not is_peft:
        raise GemcutError(f"{run_dir}: this run trained the whole model (no LoRA adapter), so there is no adapter to export; "
                          "leave out --no-merge")
    out = Path(out_dir) if out_dir is not None else default_gguf_dir(run_dir, merge, quantize)
    if out.exists() and any(out.iterdir()):
        raise GemcutError(f"{out} exists and is not empty; pass another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    name = run_dir.resolve().name
    chat = {"chat_template": template.source if template else None,
            "end_of_turn_id": turn_end_id(template) if template else None}
    info: dict = {"source_run": str(run_dir.resolve()), "base_model": loaded.base_name, "task": loaded.task,
                  "format": "gguf", "merge": merge, "quantize": quantize, "files": {}}
    if merge:
        merged = (model.merge_and_unload() if is_peft else model).float().eval()
        written = write_model_gguf(merged, loaded.tokenizer, out / MODEL_FILE, quantize=quantize, name=name, **chat)
        info["files"][MODEL_FILE] = written
        gguf_name, adapter_name, params_model = MODEL_FILE, None, merged
    else:
        info["files"][ADAPTER_FILE] = write_lora_gguf(model, out / ADAPTER_FILE, name=f"{name}-adapter")
        base = model.float().eval().unload()  # the base weights alone, as the run started from them
        info["files"][BASE_FILE] = write_model_gguf(base, loaded.tokenizer, out / BASE_FILE, quantize=quantize,
                                                    name=loaded.base_name, **chat)
        gguf_name, adapter_name, params_model = BASE_FILE, ADAPTER_FILE, base
    if template is not None:
        try:
            text = modelfile_text(template, gguf_name, adapter_name=adapter_name, parameters=ollama_parameters(params_model))
            (out / MODELFILE).write_text(text, encoding="utf-8")
            info["modelfile"] = MODELFILE
        except ModelfileError as exc:
            info["modelfile_error"] = str(exc)
    else:
        info["modelfile_error"] = "the run has no chat template"
    final = run_dir / "final"
    for side in SIDE_FILES:
        if (final / side).is_file():
            shutil.copy2(final / side, out / side)
    info["bytes"] = {"gguf": sum(f["bytes"] for f in info["files"].values())}
    (out / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out
