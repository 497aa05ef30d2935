"""Tiny real run folders for the evaluation tests, trained by `gemcut.train` on tiny models (seconds each).

A generative sentiment classifier (LoRA on the tiny Llama, label records), a classification head (the tiny
BERT, LoRA or full), and an SFT run on prompt/completion records. fp32 compute, so the loop's logged
validation losses can be compared with what evaluation recomputes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny import save_tiny_bert, save_tiny_llama

from gemcut.config import RunConfig

WORDS = {"positive": ["love", "great", "wonderful"], "negative": ["hate", "terrible", "awful"], "neutral": ["okay", "weather", "today"]}


def label_file(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["positive", "negative", "neutral"][i % 3]
        rows.append({"text": f"i {rng.choice(WORDS[label])} this {i}", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def completion_file(path: Path, n: int = 40) -> Path:
    rows = [{"prompt": f"what is {i} plus one?", "completion": f"the answer is {i + 1}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def general_file(path: Path) -> Path:
    convs = [[("hello world", "the quick brown fox.")], [("what is the capital of france?", "paris is the capital of france.")],
             [("how is the weather?", "the weather is okay today, nothing special.")], [("hi", "hello world")]]
    rows = [{"messages": [m for q, a in c for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]} for c in convs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_run(root: Path, name: str, *, model: str = "llama", records: str = "label", objective: str = "causal_lm",
              adapter: str = "lora", steps: int = 6, **eval_overrides) -> Path:
    from gemcut.train.run import train

    root.mkdir(parents=True, exist_ok=True)
    base = root / f"base-{model}"
    if not base.exists():
        (save_tiny_llama if model == "llama" else save_tiny_bert)(base)
    data = label_file(root / "labels.jsonl") if records == "label" else completion_file(root / "completions.jsonl")
    general = general_file(root / "general.jsonl")
    cfg = RunConfig.model_validate({
        "data": {"train": [str(data)], "split": {"validation": 0.2, "test": 0.2}},
        "model": {"name": str(base)},
        "adapter": {"method": adapter, "r": 4},
        "objective": {"kind": objective},
        "train": {"max_steps": steps, "eval_every": 2, "save_every": 2, "keep_last_n": 3, "batch_size": 4, "lr": 1e-2,
                  "precision": "fp32", "sample_prompts": 0, "warmup_steps": 0},
        "eval": {"forgetting_data": str(general), "bootstrap": 200, "max_new_tokens": 6, "num_samples": 4, **eval_overrides},
        "output": {"dir": str(root / "runs"), "name": name},
    })
    return train(cfg)
