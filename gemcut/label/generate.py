"""Fill the labeling queue: K sampled completions per prompt, from a run or a base model.

    gemcut generate runs/sft-1 prompts.jsonl --n 4 --temperature 0.9 --top-p 0.95 --seed 0

PROMPTS.jsonl holds one object a line: `{"prompt": "..."}` (rendered as a user turn with the model's chat
template), `{"messages": [...]}` (a conversation; the next assistant turn is sampled) or `{"text": "..."}`
(continued as raw text). It is read by the data pipeline's reader and checked by its record checks
(`gemcut.data`: the same encodings and byte-order marks, the same roles, the same file:line errors); a
.json, .csv, .tsv or .parquet file is read in its format, any other name as JSONL. Sampling goes through
`gemcut.generation.generate`, seeded, so the same command fills the same queue. Identical completions of
one prompt are kept once (two equal texts cannot be ranked against each other); a prompt left with fewer
than two distinct completions is not queued; both are counted. A chat prompt is queued with its messages
(exactly those `prompt_ids` rendered), so that the export, and DPO on it, use the prompt that was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemcut.config import DataConfig
from gemcut.data.normalize import Normalizer
from gemcut.data.readers import FORMAT_BY_SUFFIX, read_source
from gemcut.errors import DataError
from gemcut.generation import generate
from gemcut.label.store import LabelStore


@dataclass
class PromptItem:
    shown: str  # what the labeler reads
    messages: list[dict] | None  # None: continue `shown` as raw text
    source: str  # "file:line"


PROMPT_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")


def read_prompts(path: str | Path) -> list[PromptItem]:
    """PROMPTS.jsonl -> prompts, through the data pipeline's reader and checks (file:line errors naming the
    field and the fix). Messages are kept as read, up to the last user turn."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such prompts file", path=str(path))
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    defaults = DataConfig()  # the pipeline's encodings: UTF-8, then the counted fallbacks
    check = Normalizer()
    items = []
    for row in read_source(path, fmt if fmt in PROMPT_FORMATS else "jsonl", defaults.encoding, tuple(defaults.fallback_encodings)):
        shown, messages = check.normalize_prompt(row)
        items.append(PromptItem(shown, messages, row.source))
    if not items:
        raise DataError("no prompts in the file", path=str(path))
    return items


def prompt_ids(item: PromptItem, tokenizer, template) -> list[int]:
    """The token ids a prompt's completions are sampled after: its messages rendered with the chat template and
    the generation prompt (what DPO training renders for the exported pairs), or its raw text."""
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
        texts = [_completion_text(r) for r in results[k * n:(k + 1) * n]]
        unique = [t for i, t in enumerate(texts) if t and t not in texts[:i]]
        counts["duplicates_dropped"] += len(texts) - len(unique)
        if len(unique) < 2:
            counts["prompts_skipped"] += 1
            counts["skipped"].append(f"{item.source}: fewer than 2 distinct non-empty completions")
            continue
        store.add_prompt(item.shown, unique, messages=item.messages, source=item.source, model=model_name, params=params)
        counts["queued"] += 1
        counts["completions"] += len(unique)
    return counts


def _completion_text(result) -> str:
    """The text queued for one completion. One cut by max_new_tokens in the middle of a multi-byte character
    (an emoji's first bytes) decodes to a trailing U+FFFD; that half character is dropped, so it never
    becomes a reply a labeler ranks or DPO trains on."""
    text = result.text
    if result.finish_reason == "length":
        text = text.rstrip("\ufffd")
    return text.strip()


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
