"""SFT samples during training: greedy completions of the first validation prompts, for samples.jsonl.

    python -m pytest -q tests/test_train_run.py -k sample
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gemcut.config import RunConfig

SAMPLE_MAX_NEW_TOKENS = 48  # a sample shows the model's direction, not a whole answer


def sample_prompts(config: RunConfig, kind: str, records: list[dict], labels) -> list[tuple[list[dict], str]]:
    """(conversation before the last assistant turn, that turn's text) of the first `train.sample_prompts`
    validation records; none for records without an answer to compare with."""
    if kind not in ("messages", "prompt_completion") or not config.train.sample_prompts or not records:
        return []
    from gemcut.data.tokenize import conversation

    prompts = []
    for record in records[: config.train.sample_prompts]:
        messages = conversation(record, kind, config.data, labels)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append((messages[:last], messages[last]["content"]))
    return prompts


def sample_fn(config: RunConfig, kind: str, records: list[dict], tokenizer, template, labels) -> Callable | None:
    """`sample(model) -> [{"prompt", "reference", "output"}]` for the run's validation records, or None."""
    prompts = sample_prompts(config, kind, records, labels)
    if not prompts:
        return None
    from gemcut.generation import generate_messages

    def sample(model) -> list[dict]:
        model.eval()
        with torch.no_grad():
            outs = generate_messages(model, tokenizer, template, [p for p, _ in prompts],
                                     max_new_tokens=min(config.eval.max_new_tokens, SAMPLE_MAX_NEW_TOKENS))
        return [{"prompt": p[-1]["content"], "reference": ref, "output": o.text} for (p, ref), o in zip(prompts, outs)]

    return sample
