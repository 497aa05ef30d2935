"""Fill the labeling queue: K sampled completions per prompt, from a run or a base model.

    gemcut generate runs/sft-1 prompts.jsonl --n 4 --temperature 0.9 --top-p 0.95 --seed 0

PROMPTS.jsonl holds one object a line: `{"prompt": "..."}` (rendered as a user turn with the model's chat
template), `{"messages": [...]}` (a conversation; the next assistant turn is sampled) or `{"text": "..."}`
(continued as raw text). Sampling goes through `gemcut.generation.generate`, seeded, so the same command
fills the same queue. Identical completions of one prompt are kept once (two equal texts cannot be ranked
against each other); a prompt left with fewer than two distinct completions is not queued; both are counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gemcut.errors import DataError
from gemcut.generation import generate
from gemcut.label.store import LabelStore


@dataclass
class PromptItem:
    shown: str  # what the labeler reads
    messages: list[dict] | None  # None: continue `shown` as raw text
    source: str  # "file:line"


def read_prompts(path: str | Path) -> list[PromptItem]:
    """PROMPTS.jsonl -> prompts, with file:line errors naming the field and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such prompts file", path=str(path))
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", path=str(path), line=lineno) from None
            where = f"{path}:{lineno}"
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
                msgs = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else [])
                items.append(PromptItem(obj["prompt"], msgs + [{"role": "user", "content": obj["prompt"]}], where))
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
                msgs = [m for m in obj["messages"] if isinstance(m, dict)]
                while msgs and msgs[-1].get("role") == "assistant":
                    msgs.pop()  # the turn to be sampled
                if not msgs or not all(isinstance(m.get("content"), str) for m in msgs):
                    raise DataError("field 'messages' needs {role, content} turns before the assistant's", path=str(path),
                                    line=lineno, field="messages")
                shown = "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs) if len(msgs) > 1 else msgs[0]["content"]
                items.append(PromptItem(shown, msgs, where))
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip():
                items.append(PromptItem(obj["text"], None, where))
            else:
                found = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"field 'prompt' missing or empty (found: {found or 'nothing'}); write "
                                '{"prompt": "..."}, {"messages": [...]} or {"text": "..."}', path=str(path), line=lineno,
                                field="prompt")
    if not items:
        raise DataError("no prompts in the file", path=str(path))
    return items


def prompt_ids(item: PromptItem, tokenizer, template) -> list[int]:
    if item.messages is None:
        return tokenizer(item.shown)["input_ids"]
    if template is not None:
        return list(template.prompt_ids(item.messages))
    return list(tokenizer.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def queue_completions(store: LabelStore, model, tokenizer, template, items: list[PromptItem], *, n: int,
                      temperature: float, top_p: float, seed: int, max_new_tokens: int, model_name: str,
                      batch_size: int = 16) -> dict:
    """Sample `n` completions of each prompt and queue them; returns counts for the report."""
    if n < 2:
        raise DataError(f"--n {n}: ranking needs at least 2 completions per prompt")
    if temperature <= 0:
        raise DataError("--temperature must be > 0: greedy decoding gives the same completion n times")
    rows = [prompt_ids(item, tokenizer, template) for item in items for _ in range(n)]
    stop_ids = set(template.stop_token_ids) if template is not None else None
    results = generate(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, eos_ids=stop_ids or None, batch_size=batch_size)
    params = {"temperature": temperature, "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens}
    counts = {"prompts": len(items), "queued": 0, "completions": 0, "duplicates_dropped": 0, "prompts_skipped": 0, "skipped": []}
    for k, item in enumerate(items):
        texts = [r.text.strip() for r in results[k * n:(k + 1) * n]]
        unique = [t for i, t in enumerate(texts) if t and t not in texts[:i]]
        counts["duplicates_dropped"] += len(texts) - len(unique)
        if len(unique) < 2:
            counts["prompts_skipped"] += 1
            counts["skipped"].append(f"{item.source}: fewer than 2 distinct non-empty completions")
            continue
        store.add_prompt(item.shown, unique, source=item.source, model=model_name, params=params)
        counts["queued"] += 1
        counts["completions"] += len(unique)
    return counts


def load_generator(run_or_model: str, trust_remote_code: bool = False):
    """(model, tokenizer, template) from a run folder (its final model) or a model name/folder; Python files
    shipped in the folder run only with `trust_remote_code`."""
    path = Path(run_or_model)
    if path.is_dir() and ((path / "final").is_dir() or (path / "checkpoints").is_dir()):
        from gemcut.models.load import load_run

        run = load_run(path, "final" if (path / "final").is_dir() else "last", trust_remote_code=trust_remote_code)
        return run.model, run.tokenizer, run.template
    from gemcut.config import ModelConfig
    from gemcut.data.templates import ChatTemplate
    from gemcut.models.load import load_base

    model, tokenizer = load_base(ModelConfig(name=run_or_model, trust_remote_code=trust_remote_code), "causal_lm")
    template = ChatTemplate.from_tokenizer(tokenizer, None) if getattr(tokenizer, "chat_template", None) else None
    return model.eval(), tokenizer, template
