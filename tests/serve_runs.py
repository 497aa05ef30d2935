"""Folders and a live server for the serving and export tests (tests/test_serve*.py, test_export*.py).

A real uvicorn server on 127.0.0.1 at a free port, in a thread, stopped at the end; the official `openai`
package is the client. Models are the tiny random ones of tests/tiny.py saved as folders: a plain model
folder (what an export or any transformers checkpoint looks like), a BERT classifier, and LoRA runs on one
shared base in the run-folder layout of docs/architecture.md (final/ with the adapter, tokenizer,
template.json, gemcut_run.json).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from tiny import save_tiny_bert, save_tiny_llama, tiny_tokenizer

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` on loopback in a thread; yields the base URL (…/v1 is the OpenAI base_url)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def plain_model(path: Path, seed: int = 0) -> Path:
    """A transformers folder with a ChatML chat template in its tokenizer."""
    return save_tiny_llama(path, seed=seed)


def classifier(path: Path) -> Path:
    path = save_tiny_bert(path, num_labels=3)
    cfg = json.loads((path / "config.json").read_text())
    cfg["id2label"] = {"0": "negative", "1": "neutral", "2": "positive"}
    cfg["label2id"] = {v: int(k) for k, v in cfg["id2label"].items()}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def lora_run(run_dir: Path, base_dir: Path, seed: int) -> Path:
    """A LoRA run on `base_dir` with non-zero (random) adapter weights, so that adapters change outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemcut.config import RunConfig
    from gemcut.data.templates import ChatTemplate
    from gemcut.models.load import save_final
    from gemcut.run_folder import run_meta

    tok = tiny_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    config = RunConfig.model_validate({"model": {"name": str(base_dir)}, "adapter": {"method": "lora", "r": 4, "alpha": 8}})
    save_final(model, tok, ChatTemplate.from_tokenizer(tok), run_dir / "final", meta=run_meta(config, "causal_lm", base_path=str(base_dir)))
    return run_dir
