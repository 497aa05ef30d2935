"""Record kinds: the typed shape every reader produces and every later stage consumes.

Each record is a plain dict in one of these normalised shapes (what `gemcut data prepare` writes, one per
JSONL line), plus `_source` = "file:line" so that any later error can point back at the user's file:

| kind                | fields                                                                        |
|---------------------|-------------------------------------------------------------------------------|
| `text`              | `text`                                                                        |
| `prompt_completion` | `prompt`, `completion`, optional `system`                                     |
| `messages`          | `messages`: [{`role`: system/user/assistant/tool, `content`, optional `name`, |
|                     | `weight` 0/1, `tool_calls` (assistant), `tool_call_id` (tool)}], optional     |
|                     | `tools` (OpenAI function schemas, given to the chat template)                 |
| `label`             | `text`, `label`                                                               |
| `preference`        | `prompt` (+ optional `system`) or `messages` (the conversation so far, ending |
|                     | in a user or tool turn), `chosen`, `rejected` (ranked lists become pairs)     |

A record of a data mixture (gemcut/data/mixture.py) also carries `mixture_source`, the name of its source;
a record made by augmentation (gemcut/data/augment.py) carries `augmented`, the operation that made it.

The readers map user schemas onto these (Alpaca instruction/input/output, OpenAI chat records with content
parts, OpenAI DPO input/preferred_output/non_preferred_output, a `columns:` mapping). See docs/data.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Literal

Kind = Literal["text", "prompt_completion", "messages", "label", "preference"]
KINDS: tuple[str, ...] = ("text", "prompt_completion", "messages", "label", "preference")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
SOURCE_FIELD = "mixture_source"  # the mixture source (task) a record, and the example made of it, came from


def messages_text(messages: list[dict], tools: list[dict] | None = None) -> str:
    """A conversation as `role: content` lines; names, tool calls and tools are written in only where present,
    so a plain conversation reads (and deduplicates) as it always did."""
    lines = [f"tools: {json.dumps(tools, sort_keys=True, ensure_ascii=False)}"] if tools else []
    for m in messages:
        role = f"{m['role']} ({m['name']})" if m.get("name") else m["role"]
        calls = "".join(f"\n[call {c['function']['name']}({c['function']['arguments']})]" for c in m.get("tool_calls") or ())
        answers = f"[result of {m['tool_call_id']}] " if m.get("tool_call_id") else ""
        lines.append(f"{role}: {answers}{m['content']}{calls}")
    return "\n".join(lines)


def record_text(record: dict) -> str:
    """The text that identifies a record: used for dedup, leakage and length filters."""
    if "chosen" in record:
        prompt = messages_text(record["messages"]) if "messages" in record else record["prompt"]
        return f"{prompt}\n{record['chosen']}\n{record['rejected']}"
    if "messages" in record:
        return messages_text(record["messages"], record.get("tools"))
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
    if "chosen" in record:  # before messages: a preference prompt may be a conversation
        return "preference"
    if "messages" in record:
        return "messages"
    if "completion" in record:
        return "prompt_completion"
    if "label" in record:
        return "label"
    return "text"
