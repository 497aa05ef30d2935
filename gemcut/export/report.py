"""Size, speed and quality of an int8 export against the float model it came from.

    python -c "from gemcut.export.report import compare_int8; ..."   # run by `gemcut export --quantize int8`

- size: bytes of the weights, float32 (parameters x 4) vs the int8 safetensors file (`weight_bytes`; merge.py
  records a folder's sizes with it and `folder_bytes`);
- speed: greedy generation of `new_tokens` tokens from a fixed prompt, tokens per second, on the CPU;
- quality: perplexity of both models on held-out English (question/answer pairs of the packaged chatterbot
  corpus rendered as plain text; a few built-in sentences when it is not installed), the fraction of
  positions where both models predict the same next token, and the mean KL(float || int8) per token.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import torch
import yaml


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files only (what quantization shrinks)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


FALLBACK_TEXTS = [
    "The weather today is sunny with a light breeze from the west.",
    "Can you tell me how to reset my password? Open the settings page and choose reset.",
    "Machine learning models learn patterns from examples instead of explicit rules.",
    "What is the capital of France? The capital of France is Paris.",
]


def heldout_texts(limit: int = 32) -> list[str]:
    """Question + answer lines from the chatterbot corpus (a fixed, sorted selection), or FALLBACK_TEXTS."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        return FALLBACK_TEXTS[:limit]
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    texts = []
    for f in sorted(root.glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []):
            if len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
                texts.append(f"{conv[0]} {conv[1]}")
    return texts[:: max(1, len(texts) // limit)][:limit] or FALLBACK_TEXTS[:limit]


@torch.no_grad()
def _quality(model, tokenizer, texts: list[str]) -> tuple[float, list[torch.Tensor]]:
    nll, count, logps = 0.0, 0, []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, dim=-1)
        nll -= lp.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
        logps.append(lp)
    return math.exp(nll / max(count, 1)), logps


@torch.no_grad()
def _speed(model, tokenizer, new_tokens: int) -> float:
    from gemcut.generation import generate

    prompt = tokenizer("The history of the printing press begins")["input_ids"]
    generate(model, tokenizer, [prompt], max_new_tokens=2)  # warm-up: first call pays one-off costs
    t0 = time.perf_counter()
    out = generate(model, tokenizer, [prompt], max_new_tokens=new_tokens, eos_ids=[])
    return len(out[0].token_ids) / (time.perf_counter() - t0)


def compare_int8(float_model, int8_dir: str | Path, tokenizer, texts: list[str] | None = None, new_tokens: int = 32) -> dict:
    """Measure the float model against the int8 export in `int8_dir` (both on the CPU)."""
    from gemcut.models.int8 import load_int8

    float_model = float_model.float().cpu().eval()
    q_model, _ = load_int8(int8_dir)
    texts = texts or heldout_texts()
    ppl_f, lp_f = _quality(float_model, tokenizer, texts)
    ppl_q, lp_q = _quality(q_model, tokenizer, texts)
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(lp_f, lp_q))
    total = sum(a.shape[0] for a in lp_f)
    kl = sum((a.exp() * (a - b)).sum().item() for a, b in zip(lp_f, lp_q)) / max(total, 1)
    unique = {p.data_ptr(): p for p in float_model.state_dict().values()}  # tied embeddings count once
    float_bytes = sum(p.numel() * 4 for p in unique.values())
    return {
        "weights_bytes": {"float32": float_bytes, "int8": weight_bytes(Path(int8_dir))},
        "tokens_per_second": {"float32": round(_speed(float_model, tokenizer, new_tokens), 2),
                              "int8": round(_speed(q_model, tokenizer, new_tokens), 2),
                              "threads": torch.get_num_threads(), "new_tokens": new_tokens},
        "quality": {"texts": len(texts), "tokens": total, "perplexity_float32": round(ppl_f, 4), "perplexity_int8": round(ppl_q, 4),
                    "top1_agreement": round(agree / max(total, 1), 4), "mean_kl": round(kl, 6)},
    }
