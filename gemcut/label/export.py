"""Rankings out as preference records, in gemcut's `preference` kind or OpenAI's DPO format (and back).

    gemcut label export --out prefs.jsonl [--format gemcut|openai] [--db URL]

A ranking c1 > c2 > ... > cK of one prompt gives every ordered pair (ci, cj) with i < j, so K(K-1)/2
records, each with the labeler and the time of the ranking. gemcut format, one JSON object a line:

    {"prompt": ..., "chosen": ..., "rejected": ..., "_labeler": ..., "_ranked_at": "2024-05-01T12:00:00Z",
     "_prompt_id": 3, "_ranking_id": 7, "_chosen_rank": 1, "_rejected_rank": 3}

(the `_` prefix marks provenance that the data pipeline carries along but does not train on, so the file
is a training file as it is: `data.train: [prefs.jsonl]`).

OpenAI's preference fine-tuning format (https://platform.openai.com/docs/guides/direct-preference-optimization):

    {"input": {"messages": [{"role": "user", "content": ...}]},
     "preferred_output": [{"role": "assistant", "content": ...}],
     "non_preferred_output": [{"role": "assistant", "content": ...}]}

`read_preferences` reads either back into `preference` records with file:line errors.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from gemcut.errors import DataError
from gemcut.label.store import LabelStore, RankingRow

Format = Literal["gemcut", "openai"]


def ranking_pairs(row: RankingRow) -> Iterator[dict]:
    """All ordered pairs (i < j) of one ranking as gemcut `preference` records."""
    when = row.created_at.isoformat(timespec="seconds") + "Z"
    for (i, chosen), (j, rejected) in itertools.combinations(enumerate(row.ranked, start=1), 2):
        yield {"prompt": row.prompt, "chosen": chosen, "rejected": rejected, "_labeler": row.labeler,
               "_ranked_at": when, "_prompt_id": row.prompt_id, "_ranking_id": row.ranking_id,
               "_chosen_rank": i, "_rejected_rank": j}


def to_openai(record: dict) -> dict:
    """A gemcut `preference` record in OpenAI's DPO format; labeler and time ride along in `metadata`."""
    out = {
        "input": {"messages": [{"role": "user", "content": record["prompt"]}]},
        "preferred_output": [{"role": "assistant", "content": record["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": record["rejected"]}],
    }
    meta = {k.lstrip("_"): record[k] for k in ("_labeler", "_ranked_at", "_prompt_id", "_ranking_id") if k in record}
    if meta:
        out["metadata"] = meta
    return out


def from_openai(obj: dict, path: str | None = None, line: int | None = None) -> dict:
    """An OpenAI DPO line as a gemcut `preference` record (the last user message is the prompt; a system
    message is kept as `system`)."""
    def fail(field: str, why: str) -> DataError:
        return DataError(f"field {field!r} {why}; an OpenAI DPO line has input.messages, preferred_output and "
                         "non_preferred_output (lists of {role, content})", path=path, line=line, field=field)

    msgs = (obj.get("input") or {}).get("messages") if isinstance(obj.get("input"), dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise fail("input.messages", "is missing or empty")
    users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise fail("input.messages", "has no user message with text content")
    rec: dict = {"prompt": users[-1]}
    system = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "system"]
    if system:
        rec["system"] = system[0]
    for field, key in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        out = obj.get(field)
        if not isinstance(out, list) or not out or not isinstance(out[-1], dict) or not isinstance(out[-1].get("content"), str):
            raise fail(field, "is missing or has no assistant content")
        rec[key] = out[-1]["content"]
    rec.update({"_" + k: v for k, v in (obj.get("metadata") or {}).items() if k in ("labeler", "ranked_at")})
    return rec


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


def read_preferences(path: str | Path) -> list[dict]:
    """Read a JSONL of preference pairs in either format into `preference` records with `_source`."""
    path = Path(path)
    records = []
    for lineno, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", path=str(path), line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError("each line must be a JSON object", path=str(path), line=lineno)
        if "preferred_output" in obj or "input" in obj:
            rec = from_openai(obj, str(path), lineno)
        else:
            missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(obj.get(k), str)]
            if missing:
                raise DataError(f"field {missing[0]!r} missing or not text; found keys: {', '.join(obj) or '(none)'}",
                                path=str(path), line=lineno, field=missing[0])
            rec = dict(obj)
        rec["_source"] = f"{path}:{lineno}"
        records.append(rec)
    return records


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                yield i, line
