"""Token report: how long the prepared examples are for a given model, and what max_length will do to them.

    gemcut data check chat.jsonl --kind messages --model smollm2-135m-instruct
    python -m pytest -q tests/test_tokenize.py -k token_report

For each split: min/mean/p50/p95/max token length (rendered with the chat template, before truncation or
packing), a histogram (PNG next to the report when `out_dir` is given, and a small text histogram in
`summary`), how many examples exceed `data.max_length` and what the `data.overlong` policy does to them
(truncated, dropped, with reasons), and three rendered training examples with the loss-carrying tokens
wrapped in [[...]], so a wrong loss mask is visible before any training.

The tokenizer comes in as an argument: the data layer never loads a model (the CLI loads it, through
gemcut/models/load.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gemcut.data.collate import IGNORE
from gemcut.data.tokenize import full_lengths, tokenize_records
from gemcut.tasks import Task, resolve_task

BAR = "█"


def _stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"count": 0}
    a = np.asarray(lengths)
    return {"count": int(a.size), "min": int(a.min()), "mean": round(float(a.mean()), 1),
            "p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)), "max": int(a.max())}


def _histogram(lengths: list[int], max_length: int, bins: int = 20) -> dict[str, list]:
    top = max(max(lengths, default=0), max_length)
    counts, edges = np.histogram(lengths, bins=bins, range=(0, top))
    return {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}


def text_histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 30) -> list[str]:
    """A few lines like ` 64-127 | ████████ 120`, with a marker on the bins past max_length."""
    if not lengths:
        return ["  (no examples)"]
    hist = _histogram(lengths, max_length, bins)
    peak = max(hist["counts"]) or 1
    lines = []
    for lo, hi, c in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
        over = "  > max_length" if lo >= max_length else ""
        lines.append(f"  {lo:>6}-{hi - 1:<6}| {BAR * max(1 if c else 0, round(width * c / peak)):<{width}} {c}{over}")
    return lines


def mark_loss_tokens(ids: list[int], labels: list[int], tokenizer) -> str:
    """Decode `ids`, wrapping each run of loss-carrying tokens (label != -100) in [[...]]."""
    out, run, trained = [], [], None
    for t, lab in zip(ids, labels):
        is_trained = lab != IGNORE
        if trained is not None and is_trained != trained:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        run.append(t)
        trained = is_trained
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def _render_example(ex: dict, tokenizer, label_names: list[str] | None) -> str:
    if "label" in ex:
        name = label_names[ex["label"]] if label_names else ex["label"]
        return f"{tokenizer.decode(ex['input_ids'])}  ->  label {name!r}"
    if "chosen_input_ids" in ex:
        return ("chosen:   " + mark_loss_tokens(ex["chosen_input_ids"], ex["chosen_labels"], tokenizer)
                + "\nrejected: " + mark_loss_tokens(ex["rejected_input_ids"], ex["rejected_labels"], tokenizer))
    return mark_loss_tokens(ex["input_ids"], ex["labels"], tokenizer)


def _plot(per_split: dict[str, list[int]], max_length: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    top = max([max_length] + [max(v) for v in per_split.values() if v])
    for split, lengths in per_split.items():
        if lengths:
            ax.hist(lengths, bins=40, range=(0, top), histtype="step", linewidth=1.5, label=f"{split} ({len(lengths)})")
    ax.axvline(max_length, color="red", linestyle="--", linewidth=1, label=f"max_length={max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def token_report(prepared, cfg, model_name: str, *, tokenizer, template=None, task: Task | None = None,
                 out_dir: str | Path | None = None, n_examples: int = 3) -> dict:
    """Token-length report of `prepared` (has `.splits`, `.kind`, `.labels`) for `tokenizer`, the tokenizer of
    `model_name` (the name is what the report shows).

    `cfg` is the DataConfig. The chat template is the tokenizer's own or `cfg.template`. When `out_dir` is
    given, `token_lengths.png` is written there.
    """
    from gemcut.data.templates import ChatTemplate

    kind = prepared.kind
    task = task or resolve_task("auto", kind)  # what `gemcut train` would train on these records
    if template is None and task.chat_template(kind, bool(cfg.template)) == "required":
        template = ChatTemplate.from_tokenizer(tokenizer, cfg.template, cfg.system_prompt)
    label_names = list(prepared.labels) if getattr(prepared, "labels", None) else None

    report: dict[str, Any] = {"model": model_name, "kind": kind, "task": task.name, "max_length": cfg.max_length,
                              "overlong_policy": cfg.overlong, "splits": {}, "examples": [], "summary": []}
    lengths_by_split: dict[str, list[int]] = {}
    summary = report["summary"]
    for split, records in prepared.splits.items():
        records = list(records)
        if kind == "label" and label_names is None:
            label_names = sorted({str(r["label"]) for r in records})
        lengths = full_lengths(records, kind, tokenizer, template, cfg, task, label_names)
        _, stats = tokenize_records(records, kind, tokenizer, template, cfg, task, label_names)
        over = sum(1 for n in lengths if n > cfg.max_length)
        entry = {**_stats(lengths), "over_max_length": over, "truncated": stats["truncated"],
                 "dropped": stats["dropped"], "dropped_sources": stats["dropped_sources"],
                 "examples": stats["examples"], "tokens": stats["tokens"], "loss_tokens": stats["loss_tokens"],
                 "histogram": _histogram(lengths, cfg.max_length)}
        if kind == "text":
            entry["over_max_length_action"] = "split across blocks (continued pretraining packs documents)"
            entry["blocks"] = stats.get("blocks", 0)
        else:
            entry["over_max_length_action"] = "truncated" if cfg.overlong == "truncate" else "dropped"
        report["splits"][split] = entry
        lengths_by_split[split] = lengths
        s = entry
        if s["count"]:
            summary.append(f"{split}: {s['count']} examples, tokens min {s['min']} / mean {s['mean']} / p50 {s['p50']} "
                           f"/ p95 {s['p95']} / max {s['max']}; {over} over max_length={cfg.max_length} "
                           f"({entry['over_max_length_action']}); dropped {sum(stats['dropped'].values())} {stats['dropped'] or ''}".rstrip())
        else:
            summary.append(f"{split}: no examples")
        summary.extend(text_histogram(lengths, cfg.max_length))
    train = list(prepared.splits.get("train", []))[:n_examples]
    if train:
        from types import SimpleNamespace

        # Unpacked, so that each example shows on its own.
        shown_cfg = SimpleNamespace(**{**cfg.model_dump(), "packing": False}) if hasattr(cfg, "model_dump") else cfg
        examples, _ = tokenize_records(train, kind, tokenizer, template, shown_cfg, task, label_names)
        report["examples"] = [_render_example(ex, tokenizer, label_names) for ex in examples[:n_examples]]
    if out_dir is not None:
        report["plot"] = str(_plot(lengths_by_split, cfg.max_length, Path(out_dir) / "token_lengths.png"))
    return report
