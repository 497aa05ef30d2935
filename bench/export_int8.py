"""Size, speed and quality of `gemcut export --quantize int8` on the real SmolLM2-135M-Instruct.

    python bench/export_int8.py --out /tmp/gemcut_int8_bench [--run RUN]

Without --run it builds a run folder on smollm2-135m-instruct with a freshly initialised LoRA adapter (B = 0,
so the merged model is the base model itself: the figures are those of the model, not of a fine-tune)
through `save_final`, exports it merged as int8, and prints export.json's int8_report (weights bytes,
greedy tokens/s at the current torch thread count, perplexity on held-out chatterbot Q/A, top-1
agreement and mean KL against float32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch


def build_run(out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from gemcut.config import RunConfig
    from gemcut.data.templates import ChatTemplate
    from gemcut.models.load import load_base, save_final
    from gemcut.run_folder import run_meta

    cfg = RunConfig.model_validate({"model": {"name": "smollm2-135m-instruct"}})
    model, tok = load_base(cfg.model, "causal_lm")
    model = get_peft_model(model, LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, target_modules="all-linear"))
    save_final(model, tok, ChatTemplate.from_tokenizer(tok), out / "final", meta=run_meta(cfg, "causal_lm"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("/tmp/gemcut_int8_bench"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from gemcut.export import export_run

    if args.out.exists():
        shutil.rmtree(args.out)
    run = args.run or build_run(args.out / "run")
    folder = export_run(run, args.out / "int8", merge=True, quantize="int8")
    print(json.dumps(json.loads((folder / "export.json").read_text())["int8_report"], indent=2))


if __name__ == "__main__":
    main()
