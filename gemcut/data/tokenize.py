"""Records -> tokenized examples (dicts of Python lists), with every truncation and drop counted.

    python -m pytest -q tests/test_tokenize.py

`tokenize_records(records, kind, tokenizer, template, cfg, task)` returns `(examples, stats)`:

| kind (task)                  | example fields                                                               |
|------------------------------|------------------------------------------------------------------------------|
| text (causal_lm)             | `input_ids`, `labels`, `position_ids`: documents + EOS, concatenated and cut  |
|                              | into blocks of `max_length`; positions restart at 0 at each document start   |
| prompt_completion, messages  | `input_ids`, `labels` (-100 where the loss weight is 0), optional            |
| (causal_lm)                  | `loss_weight`; rendered with the chat template (a record's `tools` too);     |
|                              | `data.packing` packs rows                                                    |
| label (classify)             | `input_ids`, `label` (index into `label_names`)                              |
| label (causal_lm)            | generative classifier: user turn = `data.instruction` with {labels}, {text}; |
|                              | assistant turn = the label; then as messages                                 |
| preference (dpo, reward)     | `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels`: |
|                              | prompt + response rendered with the template, -100 on the shared prompt; a  |
|                              | `messages` prompt is rendered as it is, so its ids are `template.prompt_ids` |
|                              | of those messages: what `gemcut generate` sampled from                       |

A record of a data mixture gives its example its `mixture_source` (the source's name; gemcut/data/mixture.py).
`loss_weight` appears (on every example) only when some weight is neither 0 nor 1 (per-message `weight`).
Overlong examples follow `data.overlong`: `truncate` keeps the first `max_length` tokens, `drop` drops the
example; an example left with no loss-carrying token is dropped too. `stats` counts each case with its
reason and the `_source` (file:line) of the first few, so nothing disappears silently. Text documents are
never truncated: a long document continues in the next block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from gemcut.data.collate import IGNORE
from gemcut.data.records import ROLES, SOURCE_FIELD, sort_labels
from gemcut.errors import ConfigError, DataError
from gemcut.tasks import Task

CHUNK = 512  # records rendered and tokenized per batched tokenizer call
SHOW_SOURCES = 10  # how many file:line examples each drop/truncation reason keeps for the report


def _source(record: dict) -> str:
    return str(record.get("_source", "?"))


class Counter:
    """Counts per reason plus the first few sources, for the data report."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.sources: dict[str, list[str]] = {}

    def add(self, reason: str, source: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.sources.setdefault(reason, [])
        if len(shown) < SHOW_SOURCES:
            shown.append(source)


# ---------------------------------------------------------------- records -> conversations


def label_prompt(instruction: str, label_names: list[str], text: str) -> str:
    """`data.instruction` filled in; str.replace, not format: the text may contain braces."""
    return instruction.replace("{labels}", ", ".join(label_names)).replace("{text}", text)


def _prompt_messages(prompt: Any, record: dict) -> list[dict]:
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    if not isinstance(prompt, str):
        raise DataError(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}",
                        path=_source(record), field="prompt")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return messages + [{"role": "user", "content": prompt}]


def preference_prompt(record: dict) -> list[dict]:
    """The prompt of a preference record as messages: its `messages` as they are, or `system` + `prompt`."""
    if "messages" in record:
        return _check_messages(record)
    return _prompt_messages(record["prompt"], record)


def _context(prompt: list[dict]) -> list[dict]:
    """A preference prompt's earlier assistant turns are context, never trained: only chosen/rejected are."""
    return [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in prompt]


def _check_messages(record: dict) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("field 'messages' must be a non-empty list of {role, content}", path=_source(record), field="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"messages[{i}] must have role {'/'.join(ROLES)} and a string content; got {m!r:.120}",
                            path=_source(record), field="messages")
    return messages


def conversation(record: dict, kind: str, cfg, label_names: list[str] | None) -> list[dict]:
    """The chat a record is trained as (prompt_completion, messages, and label for a generative classifier)."""
    if kind == "messages":
        return _check_messages(record)
    if kind == "prompt_completion":
        completion = {"role": "assistant", "content": str(record["completion"])}
        if record.get("weight") is not None:
            completion["weight"] = record["weight"]
        return _prompt_messages(record["prompt"], record) + [completion]
    if kind == "label":
        prompt = label_prompt(cfg.instruction, label_names or [], str(record["text"]))
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["label"])}]
    raise ConfigError(f"record kind {kind!r} is not rendered as a conversation")


def resolve_label_names(records: list[dict], label_names: list[str] | None) -> list[str]:
    """The declared label set, or the labels seen in `sort_labels` order (so the label ids are stable)."""
    if label_names:
        return [str(x) for x in label_names]
    return sort_labels({str(r["label"]) for r in records})


# ---------------------------------------------------------------- policy


def _fit(ids: list[int], weights: list[float], max_length: int, policy: str) -> tuple[list[int], list[float], str | None]:
    """Apply the overlong policy; returns ids, weights and "truncated"/"overlong" (dropped) or None."""
    if len(ids) <= max_length:
        return ids, weights, None
    if policy == "drop":
        return [], [], "overlong"
    return ids[:max_length], weights[:max_length], "truncated"


def _lm_example(ids: list[int], weights: list[float]) -> dict:
    return {"input_ids": ids, "labels": [t if w > 0 else IGNORE for t, w in zip(ids, weights)], "loss_weight": weights}


def _finish_lm(examples: list[dict]) -> None:
    """Keep `loss_weight` only when some weight is fractional or above 1; otherwise labels say it all."""
    needed = any(w not in (0.0, 1.0) for ex in examples for w in ex["loss_weight"])
    for ex in examples:
        if needed:
            ex["loss_weight"] = [w if lab != IGNORE else 0.0 for w, lab in zip(ex["loss_weight"], ex["labels"])]
        else:
            del ex["loss_weight"]


# ---------------------------------------------------------------- kinds


def _chunks(records: Iterable[dict], size: int = CHUNK) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _text(records, tokenizer, cfg, stats, drops) -> list[dict]:
    """Continued pretraining: documents + EOS, one stream, cut into blocks; positions restart per document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("text records are joined with the EOS token, but this tokenizer has none; use a causal LM tokenizer")
    L = cfg.max_length
    examples: list[dict] = []
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    documents = 0

    def flush(n: int) -> None:
        examples.append({"input_ids": ids[:n], "labels": labels[:n], "position_ids": pos[:n]})
        del ids[:n], labels[:n], pos[:n]
        # A document cut by the block edge goes on at position 0 in the next block: nothing attends across
        # blocks, so its positions restart there too.
        if pos:
            shift = pos[0]
            pos[:] = [p - shift for p in pos]

    for chunk in _chunks(records):
        texts = [str(r.get("text", "")) for r in chunk]
        for record, doc in zip(chunk, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            if not doc:
                drops.add("empty", _source(record))
                continue
            doc = list(doc) + [eos]
            documents += 1
            ids.extend(doc)
            pos.extend(range(len(doc)))
            # The first token of a document is not predicted from the previous document's EOS: the two do
            # not attend to each other, so that target would be noise.
            labels.extend([IGNORE] + doc[1:])
            while len(ids) >= L:
                flush(L)
    if ids:
        stats["last_block_tokens"] = len(ids)
        flush(len(ids))
    stats["documents"] = documents
    stats["blocks"] = len(examples)
    stats["packed"] = True
    return examples


def _chat(records, kind, template, cfg, label_names, stats, drops, truncs) -> list[dict]:
    if template is None:
        raise ConfigError(f"{kind} records need a chat template; set data.template (chatml, alpaca, plain)")
    examples = []
    for chunk in _chunks(records):
        convs = [conversation(r, kind, cfg, label_names) for r in chunk]
        rendered = template.render_many(convs, train_on=cfg.train_on, tools=[r.get("tools") for r in chunk],
                                        sources=[_source(r) for r in chunk])
        for record, (ids, weights) in zip(chunk, rendered):
            ids, weights, what = _fit(ids, weights, cfg.max_length, cfg.overlong)
            if what == "overlong":
                drops.add("overlong", _source(record))
                continue
            if what == "truncated":
                truncs.add("truncated", _source(record))
            if not any(w > 0 for w in weights):
                drops.add("no_loss_tokens_after_truncation" if what else "no_loss_tokens", _source(record))
                continue
            example = _lm_example(ids, weights)
            if SOURCE_FIELD in record:  # a mixture's example keeps its source: the batch source samples by it
                example[SOURCE_FIELD] = record[SOURCE_FIELD]
            examples.append(example)
    _finish_lm(examples)
    return examples


def _classify(records, tokenizer, cfg, label_names, stats, drops, truncs) -> list[dict]:
    index = {name: i for i, name in enumerate(label_names)}
    examples = []
    for chunk in _chunks(records):
        texts = [str(r["text"]) for r in chunk]
        full = tokenizer(texts)["input_ids"]  # with the model's own [CLS]/[SEP] or BOS
        long_at = [i for i, ids in enumerate(full) if len(ids) > cfg.max_length]
        if long_at and cfg.overlong == "truncate":
            # Re-encode with truncation so that special tokens like [SEP] stay at the end.
            cut = tokenizer([texts[i] for i in long_at], truncation=True, max_length=cfg.max_length)["input_ids"]
            for i, ids in zip(long_at, cut):
                full[i] = ids
        long_set = set(long_at)
        for i, (record, ids) in enumerate(zip(chunk, full)):
            label = str(record["label"])
            if label not in index:
                raise DataError(f"label {label!r} is not one of the declared labels {label_names}; "
                                "add it to data.labels or fix the record", path=_source(record), field="label")
            if i in long_set:
                if cfg.overlong == "drop":
                    drops.add("overlong", _source(record))
                    continue
                truncs.add("truncated", _source(record))
            examples.append({"input_ids": list(ids), "label": index[label]})
    return examples


def _preference(records, template, cfg, stats, drops, truncs) -> list[dict]:
    if template is None:
        raise ConfigError("preference records are rendered with a chat template; set data.template (chatml, alpaca, plain)")
    examples = []
    for chunk in _chunks(records):
        convs = []
        for r in chunk:
            prompt = _context(preference_prompt(r))
            convs.append(prompt + [{"role": "assistant", "content": str(r["chosen"])}])
            convs.append(prompt + [{"role": "assistant", "content": str(r["rejected"])}])
        rendered = template.render_many(convs, sources=[_source(r) for r in chunk for _ in range(2)])
        for k, record in enumerate(chunk):
            pair = []
            reason = None
            for ids, weights in rendered[2 * k: 2 * k + 2]:
                ids, weights, what = _fit(ids, weights, cfg.max_length, cfg.overlong)
                reason = reason or what
                pair.append((ids, weights))
            if reason == "overlong":
                drops.add("overlong", _source(record))
                continue
            if any(not any(w > 0 for w in weights) for _, weights in pair):
                drops.add("no_loss_tokens_after_truncation" if reason else "no_loss_tokens", _source(record))
                continue
            if reason == "truncated":
                truncs.add("truncated", _source(record))
            (c_ids, c_w), (r_ids, r_w) = pair
            examples.append({
                "chosen_input_ids": c_ids, "chosen_labels": [t if w > 0 else IGNORE for t, w in zip(c_ids, c_w)],
                "rejected_input_ids": r_ids, "rejected_labels": [t if w > 0 else IGNORE for t, w in zip(r_ids, r_w)],
            })
    return examples


# ---------------------------------------------------------------- entry point


def tokenize_records(records: Iterable[dict], kind: str, tokenizer, template, cfg, task: Task,
                     label_names: list[str] | None = None) -> tuple[list[dict], dict]:
    """Tokenize records of one kind for one task; see the module docstring for the example fields. The task
    table (gemcut/tasks.py) says which example shape `kind` records take for `task`, or refuses them.

    `cfg` is the run's DataConfig (max_length, overlong, train_on, packing, instruction). `template` is a
    ChatTemplate (None is fine for text and classification). Returns (examples, stats).
    """
    stats: dict[str, Any] = {"kind": kind, "task": task.name, "max_length": cfg.max_length, "overlong_policy": cfg.overlong,
                             "train_on": cfg.train_on, "packed": False}
    drops, truncs = Counter(), Counter()
    counted: list[int] = [0]

    def count(it: Iterable[dict]) -> Iterator[dict]:
        for r in it:
            counted[0] += 1
            yield r

    if kind == "label":
        records = list(records)
        label_names = resolve_label_names(records, label_names)
        stats["label_names"] = label_names
    shape = task.shape(kind)  # a ConfigError naming the tasks that train on `kind` records
    if shape == "prompts":
        raise ConfigError(f"objective.kind={task.name} samples its own completions: its records are prompts, "
                          "which gemcut.train.rollouts.prompt_inputs tokenizes")
    if shape == "text":
        examples = _text(count(records), tokenizer, cfg, stats, drops)
    elif shape == "classify":
        examples = _classify(count(records), tokenizer, cfg, label_names, stats, drops, truncs)
    elif shape == "chat":
        examples = _chat(count(records), kind, template, cfg, label_names, stats, drops, truncs)
        if cfg.packing and examples:
            from gemcut.data.collate import pack_examples

            stats["examples_before_packing"] = len(examples)
            examples = pack_examples(examples, cfg.max_length)
            stats["packed"] = True
    else:
        examples = _preference(count(records), template, cfg, stats, drops, truncs)

    stats["records"] = counted[0]
    stats["examples"] = len(examples)
    stats["truncated"] = truncs.counts.get("truncated", 0)
    stats["truncated_sources"] = truncs.sources.get("truncated", [])
    stats["dropped"] = drops.counts
    stats["dropped_sources"] = drops.sources
    stats["tokens"], stats["loss_tokens"] = _token_counts(examples)
    return examples, stats


def _token_counts(examples: list[dict]) -> tuple[int, int]:
    tokens = loss = 0
    for ex in examples:
        for prefix in ("", "chosen_", "rejected_"):
            ids = ex.get(prefix + "input_ids")
            if ids is None:
                continue
            tokens += len(ids)
            labels = ex.get(prefix + "labels")
            loss += sum(1 for t in labels if t != IGNORE) if labels is not None else 0
        if "label" in ex:
            loss += 1
    return tokens, loss


def full_lengths(records: Iterable[dict], kind: str, tokenizer, template, cfg, task: Task,
                 label_names: list[str] | None = None) -> list[int]:
    """Token length of each record before truncation or packing (what the token report plots).

    Preference records count their longer side; text records count the document plus EOS.
    """
    lengths: list[int] = []
    for chunk in _chunks(records):
        if kind == "text":
            lengths += [len(ids) + 1 for ids in tokenizer([str(r.get("text", "")) for r in chunk], add_special_tokens=False)["input_ids"]]
        elif task.shape(kind) == "classify":
            lengths += [len(ids) for ids in tokenizer([str(r["text"]) for r in chunk])["input_ids"]]
        elif kind == "preference":
            convs = []
            for r in chunk:
                prompt = preference_prompt(r)
                convs += [prompt + [{"role": "assistant", "content": str(r[s])}] for s in ("chosen", "rejected")]
            rendered = template.render_many(convs, sources=[_source(r) for r in chunk for _ in range(2)])
            lengths += [max(len(rendered[2 * k][0]), len(rendered[2 * k + 1][0])) for k in range(len(chunk))]
        else:
            convs = [conversation(r, kind, cfg, label_names) for r in chunk]
            lengths += [len(ids) for ids, _ in template.render_many(convs, tools=[r.get("tools") for r in chunk],
                                                                     sources=[_source(r) for r in chunk])]
    return lengths
