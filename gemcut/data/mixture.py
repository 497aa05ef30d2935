"""Data mixtures: several sources (tasks) trained together in one run, each with its kind, options and weight.

    python -m pytest -q tests/test_mixture.py
    gemcut data prepare examples/mixture_sentiment_chat.yaml --out prepared/

`data.mixture.sources` lists the sources; `prepare` (prepare.py) reads, cleans, deduplicates and splits each one
on its own, with the options it sets (`source_config`), then renders every record as a chat (`as_chat`): a
`label` record becomes the user turn `instruction` and the assistant turn the label (the generative classifier
of the quickstart), a prompt/completion pair its two turns, a conversation stays as it is. So one causal-LM
objective trains every task. Each record carries its source's name in `mixture_source` (records.py), which
the batch source reads to draw each training example from a source with its sampling share
(`sampling_shares`; gemcut/train/batches.py), and evaluation reads to score each source's test records with
its own metric (gemcut/eval/per_source.py). `merge_reports` sums the sources' data reports into the run's,
with a `mixture` section of per-source counts.
"""

from __future__ import annotations

from gemcut.config import DataConfig, MixtureConfig, MixtureSource
from gemcut.data.records import SOURCE_FIELD, record_kind
from gemcut.data.tokenize import conversation, label_prompt
from gemcut.errors import DataError

# Record kinds a source may hold: each becomes a chat. Plain text is packed into blocks and preference pairs
# train another objective, so neither shares one causal-LM batch with chats.
CHAT_KINDS = ("label", "prompt_completion", "messages")


def source_config(data: DataConfig, source: MixtureSource) -> DataConfig:
    """The DataConfig that prepares one source: `data`'s settings (cleaning, split, encoding, augmentation...)
    with the source's files and the options it sets."""
    update = {"train": list(source.train), "validation": list(source.validation), "test": list(source.test),
              "kind": source.kind, "columns": dict(source.columns), "format": source.format, "labels": source.labels,
              "mixture": None}
    if source.instruction is not None:
        update["instruction"] = source.instruction
    if source.on_error is not None:
        update["on_error"] = source.on_error
    if source.limit is not None:
        update["limit"] = source.limit
    return data.model_copy(update=update)


def as_chat(record: dict, source: MixtureSource, cfg: DataConfig, labels: list[str] | None) -> dict:
    """One source record as a `messages` record tagged with the source's name. A label record keeps its `label`
    (per-task evaluation scores the answer against it); `augmented` and `_source` are kept."""
    kind = record_kind(record)
    if kind not in CHAT_KINDS:
        raise DataError(f"data.mixture source {source.name!r} holds {kind} records; a mixture trains chats, so its "
                        f"sources hold {', '.join(CHAT_KINDS)} records (train {kind} records in a run of their own)",
                        path=str(record.get("_source", "?")), reason="mixed_kinds")
    if kind == "label":
        messages = [{"role": "user", "content": label_prompt(cfg.instruction, labels or [], str(record["text"]))},
                    {"role": "assistant", "content": str(record["label"])}]
    else:
        messages = [dict(m) for m in conversation(record, kind, cfg, labels)]
    if source.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": source.system_prompt})
    out: dict = {"messages": messages}
    for key in ("tools", "item"):
        if key in record:
            out[key] = record[key]
    if kind == "label":
        out["label"] = str(record["label"])
    out[SOURCE_FIELD] = source.name
    for key in ("augmented", "_source", "_id", "_file"):
        if key in record:
            out[key] = record[key]
    return out


def sampling_shares(mixture: MixtureConfig, sizes: dict[str, int]) -> dict[str, float]:
    """Probability that a training example is drawn from each source, by name.

    With weights: weight / sum of weights. Otherwise temperature sampling over the sources' sizes (Arivazhagan
    et al., 2019, "Massively Multilingual Neural Machine Translation in the Wild", section 4.2): p_s is
    proportional to n_s^(1/T); T=1 (the default) samples in proportion to size, a larger T evens the sources
    out. A source with no training examples gets share 0.
    """
    names = [s.name for s in mixture.sources]
    if all(s.weight is not None for s in mixture.sources):
        raw = {s.name: s.weight if sizes.get(s.name, 0) else 0.0 for s in mixture.sources}
    else:
        t = mixture.temperature or 1.0
        raw = {n: sizes.get(n, 0) ** (1.0 / t) if sizes.get(n, 0) else 0.0 for n in names}
    total = sum(raw.values())
    if total <= 0:
        raise DataError("data.mixture: no source has training examples left; see each source's counts in the data report",
                        reason="no_records")
    return {n: raw[n] / total for n in names}


def interleave(lists: list[list[dict]]) -> list[dict]:
    """Round-robin over the lists (a1, b1, a2, b2, ...; a longer list's tail at the end)."""
    return [x for i in range(max(map(len, lists), default=0)) for part in lists if i < len(part) for x in (part[i],)]


def _add(a, b):
    """Sum of two report values: numbers add, dicts add key by key, lists join (without repeats), else the first."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a if a is not None else b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _add(a[k], b[k]) if k in a and k in b else (a[k] if k in a else b[k]) for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list):
        return a + [x for x in b if x not in a]
    return a if a is not None else b


SUMMED = ("sources", "records", "errors", "unused_fields", "cleaning", "duplicates", "leakage", "splits_by_file",
          "files_kept_in_train", "augment")


def merge_reports(reports: dict[str, dict]) -> dict:
    """The run's data report from its sources' reports (by name): counts summed, each source's warnings prefixed
    with its name. prepare.py then sets the merged splits, the cross-source leakage and the `mixture` section."""
    merged: dict = {}
    for rep in reports.values():
        for key in SUMMED:
            if key in rep:
                merged[key] = _add(merged.get(key), rep[key]) if key in merged else rep[key]
    merged["warnings"] = [f"{name}: {w}" for name, rep in reports.items() for w in rep.get("warnings", [])]
    first = next(iter(reports.values()))
    merged.update({"encoding": first.get("encoding"), "on_error": first.get("on_error"), "labels": None, "limit": None})
    return merged


def source_summary(source: MixtureSource, rep: dict, kind: str, labels: list[str] | None, share: float) -> dict:
    """One source's line of the report's `mixture` section: what was read, skipped, cleaned away, split, sampled."""
    return {
        "name": source.name, "files": list(source.train), "kind": kind, "labels": labels, "weight": source.weight,
        "sampling_share": round(share, 6), "records": rep["records"],
        "splits": {s: v["count"] for s, v in rep["splits"].items()},
        **({"labels_by_split": {s: v["labels"] for s, v in rep["splits"].items() if "labels" in v}} if kind == "label" else {}),
        **({"augment": rep["augment"]} if rep.get("augment") else {}),
    }
