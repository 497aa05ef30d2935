"""Map raw rows onto the record kinds of `gemcut.data.records`, validating every field on the way.

    python -c "from gemcut.data.normalize import Normalizer; from gemcut.data.readers import Row; \
print(Normalizer('auto').normalize(Row('x.jsonl', 1, {'instruction': 'Add', 'input': '1+1', 'output': '2'})))"

A bad record raises `DataError` naming file:line, the field, a short `reason` (counted in the report when
`data.on_error=skip`) and the fix. Reasons: missing_field, extra_field, wrong_type, empty_text, unknown_role,
roles_not_alternating, tool_call_mismatch, no_assistant_turn, label_not_declared, chosen_equals_rejected,
ranking_ties, mixed_kinds (plus the readers' malformed_json, duplicate_key, too_deep, ...: docs/data.md).

With `kind: auto` the first record fixes the kind; a later record whose fields clearly make another kind
is a `mixed_kinds` error, never silently flattened or misread. Labels are strings: an integer label 1 and a
string "1" are one label, and each label's spellings are counted (`label_spellings`) for the report.

User schemas accepted besides the normalised shapes: Alpaca (instruction/input/output -> prompt/completion),
OpenAI chat fine-tuning records (`name`, assistant `tool_calls` with JSON-string arguments, `tool` messages
with `tool_call_id`, a record-level `tools` list, content as a list of text parts -> joined, assistant
`weight` 0/1; with `data.extra_fields: keep` the other top-level fields of a row, such as a reinforcement
row's `reference_answer`, are kept as the record's `item`), OpenAI DPO (input.messages/preferred_output/non_preferred_output -> prompt/chosen/rejected,
or messages/chosen/rejected when the input is more than a system and a user message), a ranked list
(prompt + completions, best first, or with `rank`/`score`) expanded into every better/worse pair, and a
`columns:` mapping from gemcut field names to the user's. `kind: text` on conversation, pair or label data
flattens each record into one document (see docs/data.md).
"""

from __future__ import annotations

import difflib
import json
import math
from collections import Counter
from itertools import combinations
from typing import Any, NoReturn

from gemcut.data.readers import Row
from gemcut.data.records import KINDS, ROLES
from gemcut.errors import DataError

# Every field name some supported schema uses; anything else in a JSON record is an error (likely a typo).
KNOWN_FIELDS = {
    "text", "label", "prompt", "completion", "system", "messages", "tools", "chosen", "rejected", "completions",
    "instruction", "input", "output", "preferred_output", "non_preferred_output",
}
MESSAGE_FIELDS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")
# With data.extra_fields=keep, a record's fields that its kind does not use are kept under this key.
ITEM = "item"
# Bookkeeping fields that are never data: kept out of training silently by design, and documented so.
PASSTHROUGH = {"id", "metadata"}
ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}


def infer_kind(value: Any) -> str | None:
    """The record kind a dict's fields suggest, or None when they fit none."""
    if not isinstance(value, dict):
        return None
    keys = set(value)
    if keys & {"chosen", "rejected", "completions", "preferred_output", "non_preferred_output"}:
        return "preference"  # before messages: a preference prompt may be a conversation
    if "messages" in keys:
        return "messages"
    if keys & {"completion", "output", "instruction"}:
        return "prompt_completion"
    if "label" in keys:
        return "label"
    if "text" in keys:
        return "text"
    return None


def flatten_to_text(record: dict) -> str:
    """One document from any record kind: turns and parts joined by newlines, roles and labels left out."""
    if "chosen" in record:
        prompt = [m["content"] for m in record["messages"]] if "messages" in record else [record.get("system"), record["prompt"]]
        return "\n".join(x for x in (*prompt, record["chosen"]) if x)
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"] if m["content"])
    if "completion" in record:
        return "\n".join(x for x in (record.get("system"), record["prompt"], record["completion"]) if x)
    return record["text"]


class Normalizer:
    """Turns `Row`s into normalised records of one kind. `unused` counts fields a record had but its kind
    does not use (tabular columns are reported per file by the caller)."""

    def __init__(self, kind: str = "auto", columns: dict[str, str] | None = None, labels: list[str] | None = None, *,
                 extra_fields: str = "error", prompts_only: bool = False):
        if kind != "auto" and kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if extra_fields not in ("error", "keep"):
            raise ValueError(f"unknown extra_fields policy {extra_fields!r}")
        self.kind = kind
        self.keep_extra = extra_fields == "keep"  # data.extra_fields: unknown fields become the record's `item`
        self.prompts_only = prompts_only  # data.prompts_only: RL prompts, a conversation may end with the user
        self.columns = dict(columns or {})
        self.reverse = {user: ours for ours, user in self.columns.items()}
        self.labels = list(labels) if labels else None
        self.unused: Counter = Counter()
        self.first_source: str | None = None  # the record `auto` took the kind from
        self.label_spellings: dict[str, Counter] = {}  # label -> how it was written (json) -> records

    # ------------------------------------------------------------ entry points

    def resolve_kind(self, row: Row) -> str:
        """Fix `auto` to the kind the first row suggests; later rows must then fit that kind."""
        if self.kind == "auto":
            mapped = self._map_columns(row.value, row) if isinstance(row.value, dict) else row.value
            found = infer_kind(mapped)
            if found is None:
                keys = ", ".join(map(str, mapped)) if isinstance(mapped, dict) else type(mapped).__name__
                raise DataError(
                    f"cannot tell the record kind from the fields ({keys}); set data.kind (one of {', '.join(KINDS)}) "
                    "and map your fields with data.columns, e.g. columns: {text: tweet, label: sentiment}",
                    path=row.path, line=row.line, reason="missing_field")
            self.kind, self.first_source = found, row.source
        return self.kind

    def normalize(self, row: Row) -> tuple[list[dict], set[str]]:
        """Records made from one row (a ranked preference list yields several) and the row's unused fields."""
        if row.error is not None:
            raise row.error
        value = row.value
        if not isinstance(value, dict):
            self._fail(row, None, "wrong_type", f"a record must be a JSON object with named fields, got {type(value).__name__}")
        kind = self.resolve_kind(row)
        value = self._map_columns(value, row)
        self._check_same_kind(value, row)
        if not self.keep_extra:
            self._check_unknown(value, row)
        natural = infer_kind(value) if kind == "text" else kind
        if natural is None:  # kind text but no field fits any kind: report the missing text
            natural = "text"
        if "tools" in value and natural != "messages" and not row.tabular:
            self._fail(row, "tools", "extra_field", 'field "tools" goes with messages records (a conversation whose assistant '
                       f"turns call the tools); this is a {natural} record")
        builder = getattr(self, f"_build_{natural}")
        records, used = builder(value, row)
        if kind == "text" and natural != "text":
            records = [{"text": flatten_to_text(r)} for r in records]
            used = used - {"label"}
        unused = {k for k in value if k not in used and not str(k).startswith("_")}
        if self.keep_extra and unused:
            # The row's own fields, as given (a grader reads them as {{item.x}}); each record gets its own copy.
            item = {k: value[k] for k in value if k in unused}
            records = [{**r, ITEM: json.loads(json.dumps(item, default=str))} for r in records]
            unused = set()
        for r in records:
            r["_source"] = row.source
        return records, unused

    def normalize_prompt(self, row: Row) -> tuple[str, list[dict] | None]:
        """A prompt to sample from (`gemcut generate`), checked like a training record: `{prompt, system?}` ->
        (prompt, messages); `{messages}` -> (the conversation shown as text, its messages up to the last user
        turn: a trailing assistant turn is what gets sampled); `{text}` -> (text, None: continued as raw text)."""
        if row.error is not None:
            raise row.error
        value = row.value
        if not isinstance(value, dict):
            self._fail(row, None, "wrong_type", f"a prompt must be a JSON object with named fields, got {type(value).__name__}")
        value = self._map_columns(value, row)
        if "tools" in value:
            self._fail(row, "tools", "extra_field", 'field "tools": gemcut generate samples without tools; remove "tools" from the prompt file')
        if "messages" in value:
            self._check_unknown(value, row, "messages")
            msgs = self._messages(value["messages"], row, "messages", need_assistant=False)
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            if not msgs or msgs[-1]["role"] not in ("user", "tool"):
                self._fail(row, "messages", "missing_field", "messages has no user turn to answer; add one")
            shown = "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs) if len(msgs) > 1 else msgs[0]["content"]
            return shown, msgs
        if "prompt" in value:
            self._check_unknown(value, row, "prompt_completion")
            prompt, system = self._str(value, "prompt", row), self._str(value, "system", row, required=False)
            return prompt, ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if "text" in value:
            self._check_unknown(value, row, "text")
            return self._str(value, "text", row), None
        found = ", ".join(map(str, value))
        self._fail(row, "prompt", "missing_field", f"field 'prompt' missing or empty (found: {found or 'nothing'}); write "
                   '{"prompt": "..."}, {"messages": [...]} or {"text": "..."}')

    # ------------------------------------------------------------ helpers

    def _map_columns(self, value: dict, row: Row) -> dict:
        if not self.columns:
            return value
        out = {}
        for key, v in value.items():
            if key in self.reverse:
                out[self.reverse[key]] = v
            elif key in self.columns and self.columns[key] in value:
                # The user mapped this gemcut field to another column, which this row has. (A row without that
                # column, from another file of data.train, may use gemcut's own name.)
                out[f"{key} (unmapped)"] = v
            else:
                out[key] = v
        return out

    def _check_same_kind(self, value: dict, row: Row) -> None:
        """With `auto`, a record whose fields make another kind than the first record's is an error. A record
        that only looks like `text` is left to the builders: a missing label or completion names itself better."""
        if self.first_source is None:
            return
        found = infer_kind(value)
        if found not in (None, "text", self.kind):
            self._fail(row, None, "mixed_kinds",
                       f"this record is {found}, but the first record ({self.first_source}) is {self.kind}, and a run reads one kind; "
                       "put each kind in its own file, or set data.kind: text to flatten every record into a document")

    def _fail(self, row: Row, field: str | None, reason: str, message: str) -> NoReturn:
        where = f"conversation {row.locator}: " if row.locator else ""
        raise DataError(where + message, path=row.path, line=row.line, field=field, reason=reason)

    def _user_name(self, field: str) -> str:
        return f' (column "{self.columns[field]}", mapped by data.columns)' if field in self.columns else ""

    def _check_unknown(self, value: dict, row: Row, kind: str | None = None) -> None:
        if row.tabular:
            return  # unused columns are reported once per file, not per row
        kind = kind or self.kind
        for key in value:
            if key in KNOWN_FIELDS or key in PASSTHROUGH or str(key).startswith("_"):
                continue
            near = difflib.get_close_matches(str(key), sorted(KNOWN_FIELDS), n=1, cutoff=0.6)
            hint = f'; did you mean "{near[0]}"?' if near else ""
            self._fail(row, str(key), "extra_field",
                       f'unknown field "{key}"{hint} A {kind} record has: {", ".join(_kind_fields(kind))}. '
                       "Rename it, map it with data.columns, or prefix it with _ to keep it out of training")

    def _get(self, value: dict, field: str, row: Row, *, required: bool = True) -> Any:
        if field in value and value[field] is not None:
            return value[field]
        if not required:
            return None
        found = ", ".join(map(str, value)) or "(none)"
        near = difflib.get_close_matches(field, [str(k) for k in value], n=1, cutoff=0.6)
        hint = f'; did you mean "{near[0]}"? Rename it or map it with data.columns' if near else "; add it or map your field with data.columns"
        self._fail(row, field, "missing_field", f'field "{field}"{self._user_name(field)} missing; found keys: {found}{hint}')

    def _str(self, value: dict, field: str, row: Row, *, required: bool = True, allow_empty: bool = False) -> str | None:
        v = self._get(value, field, row, required=required)
        if v is None:
            return None
        return self._check_str(v, field, row, allow_empty=allow_empty)

    def _check_str(self, v: Any, field: str, row: Row, *, allow_empty: bool = False) -> str:
        if not isinstance(v, str):
            self._fail(row, field, "wrong_type", f'field "{field}" must be a string, got {type(v).__name__} ({_short(v)})')
        if not allow_empty and not v.strip():
            self._fail(row, field, "empty_text", f'field "{field}" is empty; fill it in or remove the record')
        return v

    # ------------------------------------------------------------ one builder per kind: (records, fields used)

    def _build_text(self, value: dict, row: Row) -> tuple[list[dict], set[str]]:
        return [{"text": self._str(value, "text", row)}], {"text"}

    def _build_label(self, value: dict, row: Row) -> tuple[list[dict], set[str]]:
        text = self._str(value, "text", row)
        written = self._get(value, "label", row)
        if isinstance(written, bool) or not isinstance(written, (str, int)):
            self._fail(row, "label", "wrong_type", f'field "label" must be a string (or an integer class id), got {type(written).__name__} ({_short(written)})')
        label = str(written).strip()
        if not label:
            self._fail(row, "label", "empty_text", 'field "label" is empty; give every record its class')
        if self.labels is not None and label not in self.labels:
            near = difflib.get_close_matches(label, self.labels, n=1, cutoff=0.6)
            hint = f' Did you mean "{near[0]}"?' if near else ""
            self._fail(row, "label", "label_not_declared",
                       f'label "{label}" is not in data.labels ({", ".join(self.labels)}).{hint} Fix the record or add the label to data.labels')
        self.label_spellings.setdefault(label, Counter())[json.dumps(written, ensure_ascii=False)] += 1
        return [{"text": text, "label": label}], {"text", "label"}

    def _build_prompt_completion(self, value: dict, row: Row) -> tuple[list[dict], set[str]]:
        system = self._str(value, "system", row, required=False)
        if "instruction" in value or "output" in value:  # Alpaca
            instruction = self._str(value, "instruction", row)
            extra = self._str(value, "input", row, required=False, allow_empty=True)
            output = self._str(value, "output", row)
            prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
            rec = {"prompt": prompt, "completion": output}
            used = {"instruction", "input", "output", "system"}
        else:
            rec = {"prompt": self._str(value, "prompt", row), "completion": self._str(value, "completion", row)}
            used = {"prompt", "completion", "system"}
        if system is not None:
            rec["system"] = system
        return [rec], used

    def _build_messages(self, value: dict, row: Row) -> tuple[list[dict], set[str]]:
        # Flattened into a text document, a conversation needs no assistant turn and no strict turn order.
        flat = self.kind == "text"
        tools = self._tools(value["tools"], row) if value.get("tools") is not None else None
        names = [t["function"]["name"] for t in tools] if tools is not None else None
        msgs = self._messages(value.get("messages"), row, "messages", need_assistant=not (flat or self.prompts_only),
                              check_order=not flat, tool_names=names)
        rec: dict[str, Any] = {"messages": msgs}
        if tools is not None:
            rec["tools"] = tools
        return [rec], {"messages", "tools"}

    def _messages(self, msgs: Any, row: Row, field: str, *, need_assistant: bool = True, check_order: bool = True,
                  tool_names: list[str] | None = None) -> list[dict]:
        """Checked messages in the normalised shape: `content` a string (text parts joined, "" for an assistant
        turn that only calls tools); `name`, `weight` (0/1), `tool_calls`, `tool_call_id` kept where given."""
        if msgs is None:
            self._get({}, field, row)
        if not isinstance(msgs, list):
            self._fail(row, field, "wrong_type", f'field "{field}" must be a list of {{role, content}} messages, got {type(msgs).__name__} ({_short(msgs)})')
        if not msgs:
            self._fail(row, field, "empty_text", f'field "{field}" is an empty list; a conversation needs a user and an assistant turn')
        out = []
        for i, m in enumerate(msgs):
            where = f"{field}[{i}]"
            if not isinstance(m, dict):
                self._fail(row, where, "wrong_type", f"{where} must be an object {{role, content}}, got {type(m).__name__} ({_short(m)})")
            for key in m:
                if key not in MESSAGE_FIELDS:
                    self._fail(row, f"{where}.{key}", "extra_field",
                               f'{where} has unknown field "{key}"; a message has role, content and optional name, weight, '
                               "tool_calls (assistant) and tool_call_id (tool)")
            role = m.get("role")
            if role is None:
                self._fail(row, f"{where}.role", "missing_field", f'{where}: field "role" missing; use one of {", ".join(ROLES)}')
            if role not in ROLES:
                hint = ROLE_HINTS.get(str(role).lower())
                near = hint or next(iter(difflib.get_close_matches(str(role), ROLES, n=1, cutoff=0.5)), None)
                dym = f' (did you mean "{near}"?)' if near else ""
                self._fail(row, f"{where}.role", "unknown_role", f'{where}.role "{role}" is not one of {", ".join(ROLES)}{dym}')
            calls = m.get("tool_calls")
            if calls is not None and role != "assistant":
                self._fail(row, f"{where}.tool_calls", "wrong_type", f"{where}.tool_calls: only assistant messages make tool calls (role is {role})")
            if calls is not None and m.get("content") in (None, ""):
                content = ""  # a turn that only calls tools: the template renders its calls
            elif m.get("content") is None:
                self._fail(row, f"{where}.content", "missing_field", f'{where}: field "content" missing')
            else:
                content = self._content(m["content"], f"{where}.content", row)
            msg: dict[str, Any] = {"role": role, "content": content}
            if m.get("name") is not None:
                msg["name"] = self._check_str(m["name"], f"{where}.name", row)
            if "weight" in m:
                w = m["weight"]
                if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
                    self._fail(row, f"{where}.weight", "wrong_type", f"{where}.weight must be 0 or 1 (0 leaves the turn out of the loss), got {_short(w)}")
                if role != "assistant":
                    self._fail(row, f"{where}.weight", "wrong_type", f"{where}.weight is only meaningful on assistant messages (role is {role})")
                msg["weight"] = w
            if calls is not None:
                msg["tool_calls"] = self._tool_calls(calls, f"{where}.tool_calls", row, tool_names)
            if m.get("tool_call_id") is not None:
                if role != "tool":
                    self._fail(row, f"{where}.tool_call_id", "wrong_type", f"{where}.tool_call_id is only for tool messages (role is {role})")
                msg["tool_call_id"] = self._check_str(m["tool_call_id"], f"{where}.tool_call_id", row)
            out.append(msg)
        if check_order:
            self._check_order(out, row, field)
        if need_assistant and not any(m["role"] == "assistant" for m in out):
            self._fail(row, field, "no_assistant_turn", "conversation has no assistant turn, so there is nothing to learn; add the reply or remove the record")
        return out

    def _check_order(self, out: list[dict], row: Row, field: str) -> None:
        """A system message may open the conversation; after it, user and assistant alternate from user, and an
        assistant turn with tool_calls is followed by one tool result per call (tool_call_id) before anything else."""
        last = None  # the role before, not counting an opening system message
        calls_at, pending = None, []  # the assistant message whose calls are being answered; ids not answered yet
        for i in range(1 if out[0]["role"] == "system" else 0, len(out)):
            msg, role = out[i], out[i]["role"]
            after = f'after "{out[i - 1]["role"]}"' if i > 0 else "at the start"
            if role == "tool":
                if calls_at is None:
                    self._fail(row, f"{field}[{i}].role", "roles_not_alternating",
                               f'{field}[{i}] is "tool" {after}; a tool message answers the tool_calls of the assistant message just before it')
                ids = [c["id"] for c in out[calls_at]["tool_calls"]]
                tid = msg.get("tool_call_id")
                if tid is None:
                    self._fail(row, f"{field}[{i}].tool_call_id", "missing_field",
                               f"{field}[{i}].tool_call_id missing; a tool result names the call it answers (here {', '.join(pending or ids)})")
                if tid not in ids:
                    self._fail(row, f"{field}[{i}].tool_call_id", "tool_call_mismatch",
                               f'{field}[{i}].tool_call_id "{tid}" answers no call of {field}[{calls_at}] ({", ".join(ids)})')
                if tid not in pending:
                    self._fail(row, f"{field}[{i}].tool_call_id", "tool_call_mismatch",
                               f'{field}[{i}].tool_call_id "{tid}" answers its call a second time; give each call one result')
                pending.remove(tid)
                last = role
                continue
            if pending:
                verb = "has" if len(pending) == 1 else "have"
                self._fail(row, f"{field}[{i}].role", "tool_call_mismatch",
                           f'{field}[{i}] is "{role}" but {", ".join(pending)} of {field}[{calls_at}] {verb} no result; '
                           f'add a "tool" message with tool_call_id "{pending[0]}" first')
            expected = "user" if last in (None, "assistant") else "assistant"
            if role != expected:
                fix = ("a system message may only come first" if role == "system"
                       else "user and assistant turns must alternate, starting with user; merge consecutive messages of one role")
                self._fail(row, f"{field}[{i}].role", "roles_not_alternating", f'{field}[{i}] is "{role}" {after}; {fix}')
            calls_at, pending = (i, [c["id"] for c in msg["tool_calls"]]) if msg.get("tool_calls") else (None, [])
            last = role

    def _content(self, v: Any, where: str, row: Row) -> str:
        """A message's content: a string, or OpenAI's list of text parts, joined as a template shows them."""
        if isinstance(v, list):
            if not v:
                self._fail(row, where, "empty_text", f"{where} is an empty list of parts; give it at least one text part")
            texts = []
            for j, part in enumerate(v):
                pw = f"{where}[{j}]"
                if not isinstance(part, dict):
                    self._fail(row, pw, "wrong_type", f'{pw} must be a text part {{"type": "text", "text": ...}}, got {type(part).__name__} ({_short(part)})')
                if part.get("type") != "text":
                    self._fail(row, pw, "wrong_type", f'{pw} is a "{part.get("type")}" part; only text parts ({{"type": "text", "text": ...}}) '
                               "are supported, so write what it shows as text or remove the part")
                texts.append(self._check_str(part.get("text"), f"{pw}.text", row, allow_empty=True))
            v = "".join(texts)
        return self._check_str(v, where, row)

    def _tools(self, tools: Any, row: Row) -> list[dict]:
        """The record's `tools`: OpenAI function schemas, passed as they are to the chat template's `tools`."""
        if not isinstance(tools, list) or not tools:
            self._fail(row, "tools", "wrong_type", 'field "tools" must be a list of {"type": "function", "function": {"name", "parameters"}} '
                       f"schemas, got {type(tools).__name__} ({_short(tools)})")
        names: set[str] = set()
        for j, t in enumerate(tools):
            tw = f"tools[{j}]"
            if not isinstance(t, dict):
                self._fail(row, tw, "wrong_type", f'{tw} must be an object {{"type": "function", "function": {{...}}}}, got {type(t).__name__} ({_short(t)})')
            if t.get("type") != "function":
                self._fail(row, f"{tw}.type", "wrong_type", f'{tw}.type must be "function", got {t.get("type")!r}')
            fn = t.get("function")
            if not isinstance(fn, dict):
                self._fail(row, f"{tw}.function", "wrong_type", f'{tw}.function must be an object {{"name", "description", "parameters"}}, got {_short(fn)}')
            if fn.get("name") is None:
                self._fail(row, f"{tw}.function.name", "missing_field", f"{tw}.function.name missing; name the function the model may call")
            name = self._check_str(fn["name"], f"{tw}.function.name", row)
            if name in names:
                self._fail(row, f"{tw}.function.name", "wrong_type", f'{tw}.function.name "{name}" is declared twice; keep one')
            names.add(name)
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                self._fail(row, f"{tw}.function.parameters", "wrong_type",
                           f"{tw}.function.parameters must be a JSON schema object, got {type(params).__name__} ({_short(params)})")
        return tools

    def _tool_calls(self, calls: Any, where: str, row: Row, tool_names: list[str] | None) -> list[dict]:
        """An assistant message's `tool_calls` in OpenAI's shape; `arguments` stays the JSON string it was given."""
        if not isinstance(calls, list) or not calls:
            self._fail(row, where, "wrong_type", f'{where} must be a non-empty list of {{"id", "type": "function", "function": {{"name", "arguments"}}}} '
                       f"calls, got {_short(calls)}")
        out, ids = [], set()
        example = 'write the arguments as a JSON object inside a string, e.g. "{\\"city\\": \\"paris\\"}"'
        for j, c in enumerate(calls):
            cw = f"{where}[{j}]"
            if not isinstance(c, dict):
                self._fail(row, cw, "wrong_type", f"{cw} must be an object {{id, type, function}}, got {type(c).__name__} ({_short(c)})")
            for key in c:
                if key not in ("id", "type", "function"):
                    self._fail(row, f"{cw}.{key}", "extra_field", f'{cw} has unknown field "{key}"; a tool call has id, type and function')
            if c.get("id") is None:
                self._fail(row, f"{cw}.id", "missing_field", f"{cw}.id missing; give each call an id, which its tool result repeats as tool_call_id")
            cid = self._check_str(c["id"], f"{cw}.id", row)
            if cid in ids:
                self._fail(row, f"{cw}.id", "tool_call_mismatch", f'{cw}.id "{cid}" is used by another call of this message; give each call its own id')
            ids.add(cid)
            if c.get("type") != "function":
                self._fail(row, f"{cw}.type", "wrong_type", f'{cw}.type must be "function", got {c.get("type")!r}')
            fn = c.get("function")
            if not isinstance(fn, dict):
                self._fail(row, f"{cw}.function", "wrong_type", f'{cw}.function must be an object {{"name", "arguments"}}, got {_short(fn)}')
            for key in fn:
                if key not in ("name", "arguments"):
                    self._fail(row, f"{cw}.function.{key}", "extra_field", f'{cw}.function has unknown field "{key}"; a call has a name and arguments')
            if fn.get("name") is None:
                self._fail(row, f"{cw}.function.name", "missing_field", f"{cw}.function.name missing; name the function called")
            name = self._check_str(fn["name"], f"{cw}.function.name", row)
            if tool_names is not None and name not in tool_names:
                near = difflib.get_close_matches(name, tool_names, n=1, cutoff=0.6)
                dym = f'; did you mean "{near[0]}"?' if near else ""
                self._fail(row, f"{cw}.function.name", "tool_call_mismatch",
                           f'{cw}.function.name "{name}" is not one of the record\'s tools ({", ".join(tool_names)}){dym}')
            aw = f"{cw}.function.arguments"
            args = fn.get("arguments")
            if args is None:
                self._fail(row, aw, "missing_field", f"{aw} missing; {example}")
            if not isinstance(args, str):
                self._fail(row, aw, "wrong_type", f"{aw} must be a string holding a JSON object (OpenAI's format), got {type(args).__name__} "
                           f"({_short(args)}); write it as json.dumps(arguments)")
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError as e:
                self._fail(row, aw, "wrong_type", f"{aw} is not valid JSON ({e.msg} at column {e.colno}); {example}")
            except (ValueError, RecursionError) as e:  # an over-long number, nesting beyond the parser
                self._fail(row, aw, "wrong_type", f"{aw} cannot be read as JSON ({type(e).__name__}); {example}")
            if not isinstance(parsed, dict):
                self._fail(row, aw, "wrong_type", f"{aw} must encode a JSON object ({{...}}), got {type(parsed).__name__}")
            out.append({"id": cid, "type": "function", "function": {"name": name, "arguments": args}})
        return out

    def _build_preference(self, value: dict, row: Row) -> tuple[list[dict], set[str]]:
        if value.keys() & {"input", "preferred_output", "non_preferred_output"}:
            return self._openai_dpo(value, row)
        if "messages" in value:
            both = next((f for f in ("prompt", "system") if f in value), None)
            if both:
                self._fail(row, both, "extra_field", 'a preference record has either "prompt" (with "system") or "messages", not both; keep one')
            head, system = self._prompt_context(value["messages"], row, "messages")
            used = {"messages"}
        else:
            system = self._str(value, "system", row, required=False)
            head = {"prompt": self._str(value, "prompt", row)}
            used = {"prompt", "system"}
        if "completions" in value:
            pairs = self._ranked(value["completions"], row)
            used |= {"completions"}
        else:
            pairs = [(self._str(value, "chosen", row), self._str(value, "rejected", row), "chosen", "rejected")]
            used |= {"chosen", "rejected"}
        records = []
        for chosen, rejected, cf, rf in pairs:
            if chosen.strip() == rejected.strip():
                self._fail(row, rf, "chosen_equals_rejected",
                           f"{cf} and {rf} are the same text, so there is no preference to learn; fix one or remove the record")
            rec = {**head, "chosen": chosen, "rejected": rejected}
            if system is not None:
                rec["system"] = system
            records.append(rec)
        return records, used

    def _prompt_context(self, msgs: Any, row: Row, field: str) -> tuple[dict, str | None]:
        """A preference prompt given as messages -> ({"messages": [...]}, None); or ({"prompt": text}, system) when
        it is an optional system message and one plain user message, which the template renders the same."""
        msgs = self._messages(msgs, row, field, need_assistant=False)
        if not any(m["role"] == "user" for m in msgs):
            self._fail(row, "prompt", "missing_field", f"{field} has no user message: the preference has no prompt")
        if msgs[-1]["role"] not in ("user", "tool"):
            self._fail(row, f"{field}[{len(msgs) - 1}].role", "roles_not_alternating",
                       f'{field} ends with an "{msgs[-1]["role"]}" turn; chosen and rejected answer the last user turn, so end the prompt with it')
        roles = [m["role"] for m in msgs]
        if roles in (["user"], ["system", "user"]) and all(set(m) == {"role", "content"} for m in msgs):
            return {"prompt": msgs[-1]["content"]}, (msgs[0]["content"] if len(msgs) == 2 else None)
        return {"messages": msgs}, None

    def _ranked(self, items: Any, row: Row) -> list[tuple[str, str, str, str]]:
        """Ranked completions -> every (better, worse) pair. Strings are best first; dicts carry `rank`
        (1 = best) or `score` (higher = better). Ties have no order, so they are errors."""
        if not isinstance(items, list) or len(items) < 2:
            self._fail(row, "completions", "wrong_type", f'field "completions" must be a list of at least two ranked completions, got {_short(items)}')
        entries = []  # (order key, text, field name)
        keyname = None
        for i, it in enumerate(items):
            where = f"completions[{i}]"
            if isinstance(it, str):
                k, text, this = i, self._check_str(it, where, row), "order"
            elif isinstance(it, dict):
                text = self._check_str(it.get("text", it.get("content")), f"{where}.text", row)
                this = "rank" if "rank" in it else "score" if "score" in it else None
                if this is None:
                    self._fail(row, where, "missing_field", f'{where} needs "rank" (1 = best) or "score" (higher = better)')
                k = it[this]
                if isinstance(k, bool) or not isinstance(k, (int, float)):
                    self._fail(row, f"{where}.{this}", "wrong_type", f"{where}.{this} must be a number, got {_short(k)}")
                if isinstance(k, float) and not math.isfinite(k):  # NaN sorts nowhere: its pairs would come out in arbitrary order
                    better = "1 = best" if this == "rank" else "higher = better"
                    self._fail(row, f"{where}.{this}", "wrong_type", f"{where}.{this} is {k}; give every completion a real number ({better})")
                k = k if this == "rank" else -k
            else:
                self._fail(row, where, "wrong_type", f"{where} must be a string or {{text, rank|score}}, got {type(it).__name__}")
            if keyname is not None and this != keyname:
                self._fail(row, where, "wrong_type", f"completions mix ranking styles ({keyname} and {this}); use one")
            keyname = this
            entries.append((k, text, where))
        by_key: dict = {}
        for k, _, where in entries:
            if k in by_key:
                shown = -k if keyname == "score" else k
                self._fail(row, where, "ranking_ties",
                           f"{by_key[k]} and {where} share {keyname} {shown}; a ranking needs a strict order (break the tie or drop one)")
            by_key[k] = where
        entries.sort(key=lambda e: e[0])
        return [(a[1], b[1], a[2], b[2]) for a, b in combinations(entries, 2)]

    def _openai_dpo(self, value: dict, row: Row) -> tuple[list[dict], set[str]]:
        inp = self._get(value, "input", row)
        if not isinstance(inp, dict) or "messages" not in inp:
            self._fail(row, "input", "wrong_type", 'field "input" must be an object {"messages": [...]} (OpenAI DPO format)')
        for key in inp:
            if key == "tools":
                self._fail(row, "input.tools", "extra_field", "input.tools: preference records do not take tools yet; remove them (input holds messages only)")
            if key != "messages":
                self._fail(row, f"input.{key}", "extra_field", f'input has unknown field "{key}"; it holds messages only')
        head, system = self._prompt_context(inp["messages"], row, "input.messages")
        outs = []
        for field in ("preferred_output", "non_preferred_output"):
            v = self._get(value, field, row)
            if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict):
                if v[0].get("role", "assistant") != "assistant":
                    self._fail(row, f"{field}[0].role", "unknown_role", f'{field}[0].role must be "assistant", got {v[0].get("role")!r}')
                outs.append(self._check_str(v[0].get("content"), f"{field}[0].content", row))
            else:
                self._fail(row, field, "wrong_type", f'field "{field}" must be a list with one assistant message, got {_short(v)}')
        if outs[0].strip() == outs[1].strip():
            self._fail(row, "non_preferred_output", "chosen_equals_rejected",
                       "preferred_output and non_preferred_output are the same text, so there is no preference to learn")
        rec = {**head, "chosen": outs[0], "rejected": outs[1]}
        if system is not None:
            rec["system"] = system
        return [rec], {"input", "preferred_output", "non_preferred_output"}


def _kind_fields(kind: str) -> list[str]:
    return {
        "text": ["text"], "label": ["text", "label"], "prompt_completion": ["prompt", "completion", "system"],
        "messages": ["messages", "tools"], "preference": ["prompt", "system", "messages", "chosen", "rejected", "completions"],
    }.get(kind, sorted(KNOWN_FIELDS))


def _short(v: Any, n: int = 40) -> str:
    try:
        s = repr(v)
    except RecursionError:  # parsed JSON can be nested nearly as deep as repr can go
        return f"a {type(v).__name__} nested too deeply to show"
    return s if len(s) <= n else s[: n - 3] + "..."
