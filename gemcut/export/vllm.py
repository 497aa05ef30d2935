"""`gemcut export RUN --format vllm`: a folder `vllm serve` loads as is, with a README giving the command.

    gemcut export runs/my-run --format vllm                 # merged bf16 model: vllm serve runs/my-run/export/vllm
    gemcut export runs/my-run --format vllm --no-merge      # the adapter, for vllm serve BASE --enable-lora --lora-modules
    python -m pytest -q tests/test_export_gguf.py -k vllm

A merged export (gemcut/export/merge.py) is already a transformers folder: config.json, model.safetensors,
tokenizer files, generation_config.json whose eos_token_id lists the template's end-of-turn tokens (vLLM
stops on them by default). vLLM reads the chat template through transformers; this module also writes it
into tokenizer_config.json's `chat_template`, where older transformers releases (and tools that read the
JSON directly) look, and writes README.md with the serve command and the request that uses it. An adapter
export is peft's adapter_config.json + adapter_model.safetensors, which vLLM's `--lora-modules name=path`
loads on top of the base; the README names the base and the `--max-lora-rank` the adapter needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemcut.export.merge import export_run
from gemcut.tasks import task_named

README = "README.md"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank


def default_vllm_dir(run_dir: Path, merge: bool) -> Path:
    return Path(run_dir) / "export" / ("vllm" if merge else "vllm-adapter")


def template_into_tokenizer_config(folder: Path) -> None:
    """Copy chat_template.jinja into tokenizer_config.json (`chat_template`), keeping every other key."""
    template_file = folder / "chat_template.jinja"
    config_file = folder / "tokenizer_config.json"
    if not template_file.is_file() or not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = template_file.read_text(encoding="utf-8")
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def serve_instructions(folder: Path, info: dict, name: str) -> str:
    """README text: the vllm serve command for this folder and an OpenAI request against it."""
    folder = folder.resolve()
    if info["merge"]:
        serve = f"vllm serve {folder} --served-model-name {name}"
    else:
        rank = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16)
        max_rank = min((r for r in VLLM_LORA_RANKS if r >= rank), default=rank)
        # The base's own tokenizer would bring its own template: name the run's.
        serve = (f"vllm serve {info['base_model']} --enable-lora --max-lora-rank {max_rank} "
                 f"--lora-modules {name}={folder} --chat-template {folder / 'chat_template.jinja'}")
    return (f"# {name} for vLLM\n\nExported by `gemcut export --format vllm` from {info['source_run']}.\n\n"
            f"```\n{serve}\n```\n\n"
            "The chat template is the run's (tokenizer_config.json and chat_template.jinja); generation_config.json "
            "stops on its end-of-turn tokens.\n\n"
            f"```\ncurl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"  -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n```\n")


def export_vllm(run_dir: str | Path, out_dir: str | Path | None = None, *, merge: bool = True, dtype: str = "bf16",
                trust_remote_code: bool = False) -> Path:
    """Export the run for vLLM (see the module docstring); returns the folder.

    Args:
        run_dir: a run folder (with final/) of a generative model.
        out_dir: default `<run_dir>/export/vllm` (merged) or `vllm-adapter`.
        merge: a merged model (default) or the LoRA adapter alone (`--lora-modules`).
        dtype: weights of a merged export: bf16 (what vLLM runs) or fp32.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else default_vllm_dir(run_dir, merge)
    folder = export_run(run_dir, out, merge=merge, dtype=dtype, trust_remote_code=trust_remote_code, report=False)
    info_file = folder / "export.json"
    info = json.loads(info_file.read_text(encoding="utf-8"))
    problems = []
    if task_named(info["task"]).served_as != "chat":
        problems.append(f"vLLM serves generative models; this run is a {info['task']} model")
    if not (folder / "chat_template.jinja").is_file():
        problems.append("the run has no chat template, so vllm serve needs --chat-template")
    if problems:
        info["warning"] = "; ".join([info["warning"], *problems] if "warning" in info else problems)
    template_into_tokenizer_config(folder)
    name = run_dir.resolve().name
    (folder / README).write_text(serve_instructions(folder, info, name), encoding="utf-8")
    info["layout"] = "vllm"
    info_file.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder
