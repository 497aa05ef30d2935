"""Rankings out as preference records, in gemcut's `preference` kind or OpenAI's DPO format (and back).

    gemcut label export --out prefs.jsonl [--format gemcut|openai] [--db URL]

A ranking c1 > c2 > ... > cK of one prompt gives every ordered pair (ci, cj) with i < j, so K(K-1)/2
records, each with the labeler and the time of the ranking. gemcut format, one JSON object a line:

    {"messages": [...], "chosen": ..., "rejected": ..., "_labeler": ..., "_ranked_at": "2024-05-01T12:00:00Z",
     "_prompt_id": 3, "_ranking_id": 7, "_chosen_rank": 1, "_rejected_rank": 3}

`messages` is the prompt's chat exactly as `gemcut generate` sampled from it (system, earlier turns, the last
user turn); a prompt queued as plain text (a `{"text"}` prompt, or a database from before messages were
kept) is written as `"prompt": "..."` instead.

(the `_` prefix marks provenance that the data pipeline carries along but does not train on, so the file
is a training file as it is: `data.train: [prefs.jsonl]`).

OpenAI's preference fine-tuning format (https://platform.openai.com/docs/guides/direct-preference-optimization):

    {"input": {"messages": [...the whole prompt chat...]},
     "preferred_output": [{"role": "assistant", "content": ...}],
     "non_preferred_output": [{"role": "assistant", "content": ...}]}

The data pipeline (`gemcut.data`) reads both formats back as `preference` records, with its file:line
errors for identical chosen/rejected or a missing prompt: an export is a training file as it is.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from gemcut.errors import DataError
from gemcut.label.store import LabelStore, RankingRow

Format = Literal["gemcut", "openai"]


def ranking_pairs(row: RankingRow) -> Iterator[dict]:
    """All ordered pairs (i < j) of one ranking as gemcut `preference` records."""
    when = row.created_at.isoformat(timespec="seconds") + "Z"
    prompt = {"messages": row.messages} if row.messages else {"prompt": row.prompt}
    for (i, chosen), (j, rejected) in itertools.combinations(enumerate(row.ranked, start=1), 2):
        yield {**prompt, "chosen": chosen, "rejected": rejected, "_labeler": row.labeler,
               "_ranked_at": when, "_prompt_id": row.prompt_id, "_ranking_id": row.ranking_id,
               "_chosen_rank": i, "_rejected_rank": j}


def to_openai(record: dict) -> dict:
    """A gemcut `preference` record in OpenAI's DPO format; labeler and time ride along in `metadata`."""
    if "messages" in record:
        messages = record["messages"]
    else:
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages.append({"role": "user", "content": record["prompt"]})
    out = {
        "input": {"messages": messages},
        "preferred_output": [{"role": "assistant", "content": record["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": record["rejected"]}],
    }
    meta = {k.lstrip("_"): record[k] for k in ("_labeler", "_ranked_at", "_prompt_id", "_ranking_id") if k in record}
    if meta:
        out["metadata"] = meta
    return out


def export_preferences(store: LabelStore, out: str | Path, fmt: Format = "gemcut") -> dict:
    """Write every ranking's pairs to `out` (JSONL); returns counts {rankings, pairs}."""
    if fmt not in ("gemcut", "openai"):
        raise DataError(f"unknown export format {fmt!r}; use gemcut or openai")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_rank = n_pairs = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in store.rankings():
            n_rank += 1
            for rec in ranking_pairs(row):
                f.write(json.dumps(to_openai(rec) if fmt == "openai" else rec, ensure_ascii=False) + "\n")
                n_pairs += 1
    tmp.replace(out)  # a half-written export never replaces a good one
    return {"rankings": n_rank, "pairs": n_pairs, "path": str(out), "format": fmt}
