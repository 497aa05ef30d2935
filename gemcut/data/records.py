"""Record kinds: the typed shape every reader produces and every later stage consumes.

Each record is a plain dict in one of these normalised shapes (what `gemcut data prepare` writes, one per
JSONL line), plus `_source` = "file:line" so that any later error can point back at the user's file:

| kind                | fields                                                                        |
|---------------------|-------------------------------------------------------------------------------|
| `text`              | `text`                                                                        |
| `prompt_completion` | `prompt`, `completion`, optional `system`                                     |
| `messages`          | `messages`: [{`role`: system/user/assistant, `content`, optional `weight`}]   |
| `label`             | `text`, `label`                                                               |
| `preference`        | `prompt`, `chosen`, `rejected` (a ranked list is expanded into such pairs)    |

The readers map user schemas onto these (Alpaca instruction/input/output, OpenAI DPO
input/preferred_output/non_preferred_output, a `columns:` mapping). See docs/data.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

Kind = Literal["text", "prompt_completion", "messages", "label", "preference"]
KINDS: tuple[str, ...] = ("text", "prompt_completion", "messages", "label", "preference")
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# The field whose text identifies a record for deduplication, leakage checks and length filters.


def record_text(record: dict) -> str:
    """The text that identifies a record: used for dedup, leakage and length filters."""
    if "messages" in record:
        return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    if "chosen" in record:
        return f"{record['prompt']}\n{record['chosen']}\n{record['rejected']}"
    if "completion" in record:
        return f"{record['prompt']}\n{record['completion']}"
    return record["text"]


_INTEGER = re.compile(r"[+-]?\d{1,30}")  # longer digit strings sort as names (int() refuses very long ones)


def sort_labels(labels: Iterable[str], declared: list[str] | None = None) -> list[str]:
    """The order of a label set, which gives the label ids: the declared labels in their declared order,
    then any others with integer labels numerically (2 before 10) and the rest alphabetically."""
    found = set(labels)
    head = [x for x in declared or [] if x in found]
    rest = sorted(found - set(head), key=lambda x: (0, int(x), x) if _INTEGER.fullmatch(x) else (1, 0, x))
    return head + rest


def record_kind(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "chosen" in record:
        return "preference"
    if "completion" in record:
        return "prompt_completion"
    if "label" in record:
        return "label"
    return "text"
