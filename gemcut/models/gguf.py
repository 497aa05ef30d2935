"""Convert a GGUF file, once, into a plain float32 safetensors folder that can be trained.

    python -c "from gemcut.models.resolve import resolve_model; print(resolve_model('smollm2-135m-instruct'))"

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`) by dequantizing every tensor, but it keeps
the model flagged as quantized (`hf_quantizer`, `config.quantization_config`), and a quantized model refuses
training and `save_pretrained` round trips. So gemcut loads the GGUF once, drops the quantization flags
(the tensors are already plain float32), and saves model, tokenizer (with its chat template) and
generation config as an ordinary folder. The folder is written under a temporary name and renamed into
place, so a process killed mid-conversion never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

SOURCE_FILE = "gemcut_source.json"  # written last inside the folder: marks a finished conversion


def _source_stamp(gguf_path: Path) -> dict:
    st = gguf_path.stat()
    return {"gguf": str(gguf_path), "size": st.st_size, "mtime": int(st.st_mtime)}


def is_converted(out_dir: Path, gguf_path: Path) -> bool:
    """True when `out_dir` holds a finished conversion of this very GGUF file (same path, size, mtime)."""
    marker = Path(out_dir) / SOURCE_FILE
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    stamp = _source_stamp(gguf_path)
    return all(saved.get(k) == v for k, v in stamp.items())


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize `gguf_path` into `out_dir` (config, model.safetensors in float32, tokenizer, generation config).

    Returns `out_dir`. Does nothing when `out_dir` already holds a conversion of the same file. Safe against
    concurrent conversions: each writes its own temporary folder and the first rename wins.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if is_converted(out_dir, gguf_path):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are dequantized already; only the flags say otherwise. Dropping them makes this an
        # ordinary float32 model that trains and saves like any other.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = out_dir.name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stamp = _source_stamp(gguf_path) | {"converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            "seconds": round(time.time() - started, 1), "dtype": "float32"}
        (tmp / SOURCE_FILE).write_text(json.dumps(stamp, indent=2))
        if out_dir.exists():  # a stale or older conversion: replace it
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(out_dir, old)
            except FileNotFoundError:
                old = None
            os.rename(tmp, out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out_dir)
            except OSError:
                # Another process finished first (rename onto a non-empty folder fails); theirs is as good.
                if not is_converted(out_dir, gguf_path):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def gguf_parameter_count(gguf_path: str | Path) -> int:
    """Number of parameters in a GGUF file, read from its tensor index (no weights are loaded)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    return int(sum(int(t.n_elements) for t in reader.tensors))
