"""Evaluation examples: read a run's prepared split and view each record as (prompt, reference).

    python -m pytest -q tests/test_eval_examples.py

The data pipeline writes `runs/<name>/data/<split>.jsonl`, one normalised record per line (shapes in
gemcut/data/records.py). Evaluation needs each record as what the model is asked and what the right
answer is:

| record kind         | prompt (messages)                                      | reference                |
|---------------------|--------------------------------------------------------|--------------------------|
| `label`             | user: `data.instruction` filled with labels and text   | the label                |
| `prompt_completion` | optional system, user: prompt                          | completion               |
| `messages`          | every turn before the last assistant turn              | the last assistant turn  |
| `preference`        | user: prompt                                           | chosen (and rejected)    |
| `text`              | none                                                   | the text (perplexity)    |

The run's `ChatTemplate` adds `data.system_prompt` when it renders a conversation that has none, exactly
as in training, so the views here leave it out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gemcut.config import DataConfig
from gemcut.data.records import record_kind
from gemcut.errors import DataError, GemcutError


@dataclass
class Example:
    """One evaluation example. `prompt` is None for `text` records; `label` only for `label` records."""

    source: str
    kind: str
    prompt: list[dict] | None
    reference: str
    label: str | None = None
    text: str | None = None
    rejected: str | None = None
    extra: dict = field(default_factory=dict)


def read_split(run_dir: str | Path, split: str) -> list[dict]:
    """The records of `run_dir/data/<split>.jsonl`, each with `_source` (the prepared file's line if absent)."""
    path = Path(run_dir) / "data" / f"{split}.jsonl"
    if not path.is_file():
        present = sorted(p.stem for p in (Path(run_dir) / "data").glob("*.jsonl")) if (Path(run_dir) / "data").is_dir() else []
        raise GemcutError(
            f"{path}: no prepared {split!r} split in this run folder (found: {', '.join(present) or 'none'}); "
            f"evaluate another split with --split, or re-run `gemcut data prepare` / `gemcut train` to write it"
        )
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg}); the prepared split is damaged, re-run `gemcut data prepare`",
                                path=str(path), line=line_no) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", path=str(path), line=line_no)
            record.setdefault("_source", f"{path}:{line_no}")
            records.append(record)
    return records


def to_example(record: dict, *, labels: list[str] | None = None, data_cfg: DataConfig | None = None) -> Example:
    """View one record as an evaluation example (table in the module docstring).

    Conversations come from `gemcut.data.tokenize.conversation`, the function training renders records
    with, so the model is asked exactly what it was trained on (`data.instruction` for label records).
    """
    from gemcut.data.tokenize import conversation

    kind = record_kind(record)
    source = str(record.get("_source", "?"))
    if kind in ("label", "prompt_completion", "messages"):
        conv = conversation(record, kind, data_cfg or DataConfig(), labels)
        conv = [{"role": m["role"], "content": m["content"]} for m in conv]
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError("a messages record needs an assistant turn after at least one other turn to be evaluated",
                            path=source, field="messages")
        if kind == "label":
            return Example(source, kind, conv[:last], str(record["label"]), label=str(record["label"]), text=str(record["text"]))
        return Example(source, kind, conv[:last], conv[last]["content"])
    if kind == "preference":
        from gemcut.data.tokenize import preference_prompt

        messages = [dict(m) for m in preference_prompt(record)]  # its messages, or system + prompt, as DPO renders it
        return Example(source, kind, messages, str(record["chosen"]), rejected=str(record["rejected"]))
    return Example(source, kind, None, str(record["text"]), text=str(record["text"]))


def split_labels(records: list[dict], declared: list[str] | None) -> list[str]:
    """The label set: the run's saved/declared labels, else the sorted labels found in the split."""
    if declared:
        return list(declared)
    return sorted({str(r["label"]) for r in records if "label" in r})
