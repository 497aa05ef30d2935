"""Data augmentation: extra training records made from the training split (paraphrases and cheap text operations).

    python -m pytest -q tests/test_augment.py
    gemcut train examples/mixture_sentiment_chat.yaml data.augment.operations='{word_dropout: 0.2}'

`prepare` (prepare.py) calls `augment_records` after the split, on the training records only, and checks every
copy against the evaluation splits with the leakage check (gemcut/data/dedup.py) before it joins train: a copy
that duplicates, or nearly duplicates, a validation or test record is removed and counted. So an augmented
record is never in validation or test, and never shares a near-duplicate group with them.

What is rewritten is the record's prompt (`prompt_text`): a label record's text, a prompt/completion pair's
prompt, a conversation's last user turn; answers and labels stay. Which records get a copy is a seeded hash of
each record's id and the operation, so it does not depend on the order of the records.

- `paraphrase`: a model rewrites the prompt (`data.augment.paraphrase`). The model lives in a layer above the
  data, so the caller passes a `Paraphraser` (gemcut/train/paraphrase.py makes one with gemcut's sampler).
- `word_dropout`: each word dropped with probability `data.augment.word_dropout` (one word always stays);
  `word_swap`: two neighbouring words swapped; `lowercase`: the text lower-cased (EDA, Wei and Zou, 2019,
  "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text Classification Tasks").

Each copy carries `augmented` (the operation) and `_source` `<original>#<operation>`; the report section
`augment` gives, per operation, how many records were chosen, made and left unchanged, with examples.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

from gemcut.config import AugmentConfig
from gemcut.data.split import position, record_id

# texts -> their paraphrases, in order ("" when the model wrote nothing usable)
Paraphraser = Callable[[list[str]], list[str]]
EXAMPLES_PER_OPERATION = 3


def prompt_text(record: dict) -> tuple[str, int | None] | None:
    """(the text augmentation rewrites, the index of its message or None), or None when the record has none."""
    messages = record.get("messages") if isinstance(record.get("messages"), list) else None
    if messages is not None:
        answer = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        users = [i for i, m in enumerate(messages[:answer]) if m.get("role") == "user" and isinstance(m.get("content"), str)]
        return (messages[users[-1]]["content"], users[-1]) if users else None
    if isinstance(record.get("prompt"), str):
        return record["prompt"], None
    if isinstance(record.get("text"), str) and "label" in record:
        return record["text"], None
    return None


def with_prompt(record: dict, text: str, operation: str) -> dict:
    """A copy of `record` whose prompt is `text`, marked as made by `operation`."""
    out = copy.deepcopy(record)
    _, index = prompt_text(record)
    if index is not None:
        out["messages"][index]["content"] = text
    elif isinstance(record.get("prompt"), str):
        out["prompt"] = text
    else:
        out["text"] = text
    out["augmented"] = operation
    out["_source"] = f"{record.get('_source', '?')}#{operation}"
    if "_id" in record:
        out["_id"] = f"{record['_id']}#{operation}"
    return out


def word_dropout(text: str, p: float, rng: random.Random) -> str:
    words = text.split()
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept or [rng.choice(words)]) if words else text


def word_swap(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) < 2:
        return text
    i = rng.randrange(len(words) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def operate(name: str, text: str, cfg: AugmentConfig, rng: random.Random) -> str:
    """One cheap operation on one text (module docstring)."""
    if name == "word_dropout":
        return word_dropout(text, cfg.word_dropout, rng)
    if name == "word_swap":
        return word_swap(text, rng)
    if name == "lowercase":
        return text.lower()
    raise ValueError(f"unknown augmentation operation {name!r}")


def chosen(record: dict, operation: str, share: float, seed: int) -> bool:
    """Whether `record` gets a copy made by `operation`: a seeded hash of its id, below `share`."""
    return position(f"{operation}:{record_id(record)}", seed) < share


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def augment_records(train: list[dict], kind: str, cfg: AugmentConfig, paraphrase: Paraphraser | None) -> tuple[list[dict], dict]:
    """(new training records, the report's `augment` section) for the training records `train` of `kind`.

    The caller checks the new records for leakage and adds `added` and `removed_by_leakage_check` to the section.
    """
    rewritable = [(r, t) for r in train if (t := prompt_text(r)) is not None]
    report: dict = {"records_with_a_prompt": len(rewritable), "operations": {}, "examples": [], "warnings": []}
    made: list[dict] = []

    def keep(operation: str, original: dict, old: str, new: str, counts: dict) -> None:
        if not new.strip() or _same(old, new):
            counts["unchanged"] += 1
            return
        made.append(with_prompt(original, new, operation))
        counts["made"] += 1
        if sum(e["operation"] == operation for e in report["examples"]) < EXAMPLES_PER_OPERATION:
            report["examples"].append({"operation": operation, "source": original.get("_source"), "original": old, "augmented": new})

    for operation, share in cfg.operations.items():
        counts = {"share": share, "chosen": 0, "made": 0, "unchanged": 0}
        for record, (text, _) in rewritable:
            if chosen(record, operation, share, cfg.seed):
                counts["chosen"] += 1
                rng = random.Random(f"{cfg.seed}:{operation}:{record_id(record)}")
                keep(operation, record, text, operate(operation, text, cfg, rng), counts)
        report["operations"][operation] = counts
    if cfg.paraphrase is not None:
        p = cfg.paraphrase
        picked = [(r, t) for r, (t, _) in rewritable if chosen(r, "paraphrase", p.share, cfg.seed)]
        counts = {"share": p.share, "model": p.model, "chosen": len(picked), "made": 0, "unchanged": 0, "written": paraphrase is not None}
        if paraphrase is None:
            report["warnings"].append(f"data.augment.paraphrase: no paraphrases were written for the {len(picked)} chosen records: "
                                      "this command loads no model to write them (gemcut train does)")
        elif picked:
            outputs = paraphrase([t for _, t in picked])
            for (record, text), new in zip(picked, outputs):
                keep("paraphrase", record, text, new.strip(), counts)
        report["operations"]["paraphrase"] = counts
    return made, report
