"""Per-task metrics of a data-mixture run: each source's test records scored with its own task's metric.

    python -m pytest -q tests/test_mixture.py -k eval

A mixture run (gemcut/data/mixture.py) trains every source as chats, so `gemcut eval` scores its split as one
generation task; each record keeps its source's name (`mixture_source`). `per_source_metrics` regroups the
answers the tuned and base models already gave (no second generation) and scores each source as its task:
a source of label records as a generative classifier (the answer mapped to the source's labels by
eval/labels.py: macro-F1, accuracy, with the confusion), a source of conversations or prompt/completion pairs
as generation (ROUGE, BLEU, exact match, and the perplexity of its references). Each gets the paired
bootstrap intervals of tuned against base, like the whole split (summary.py).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from gemcut.config import RunConfig
from gemcut.data.records import SOURCE_FIELD
from gemcut.eval.labels import map_many
from gemcut.eval.summary import ModelResults, headline_text, summarise


def source_labels(run_dir: Path) -> dict[str, list[str]]:
    """The label set of each label source, by name, from the run's data report (`mixture.sources`)."""
    path = Path(run_dir) / "data_report.json"
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {s["name"]: s["labels"] for s in (report.get("mixture") or {}).get("sources", []) if s.get("labels")}


def _subset(r: ModelResults | None, idx: list[int]) -> ModelResults | None:
    if r is None:
        return None
    return ModelResults(texts=[r.texts[i] for i in idx] if r.texts is not None else None,
                        nll=[r.nll[i] for i in idx] if r.nll is not None else None, seconds=r.seconds)


def per_source_metrics(records: list[dict], references: list[str], tuned: ModelResults, base: ModelResults | None,
                       cfg: RunConfig, run_dir: Path) -> dict | None:
    """{source name: {task, n, headline, tuned, base, deltas, ...}} for a mixture run's scored records, None for
    any other run. `records`, `references` and the results are aligned (the evaluated examples, in order)."""
    names = [r.get(SOURCE_FIELD) for r in records]
    if all(n is None for n in names):
        return None
    declared = source_labels(run_dir)
    out: dict = {}
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        t, b = _subset(tuned, idx), _subset(base, idx)
        if all("label" in records[i] for i in idx):
            labels = declared.get(name) or sorted({str(records[i]["label"]) for i in idx})
            refs = [str(records[i]["label"]) for i in idx]
            task = "generative_classification"
            for r in (t, b):
                if r is not None:
                    r.predictions, r.rules = map_many(r.texts, labels)
        else:
            labels, refs, task = [], [references[i] for i in idx], "generation"
        s = summarise(task, refs, labels, t, b, n_resamples=cfg.eval.bootstrap, seed=cfg.train.seed)
        out[str(name)] = {"n": len(idx), "labels": labels or None, "headline": headline_text(s), **s}
    return out


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"


SHOWN = ("macro_f1", "accuracy", "unparseable_rate", "rougeL", "bleu", "exact_match", "perplexity")


def per_source_section(ev: dict) -> str:
    """The report's per-task table (report.html): each source's metrics, base and tuned, and its headline."""
    per = ev.get("per_source")
    if not per:
        return ""
    rows = []
    for name, s in per.items():
        for metric in SHOWN:
            if metric not in (s.get("tuned") or {}):
                continue
            base = (s.get("base") or {}).get(metric)
            d = (s.get("deltas") or {}).get(metric) or {}
            ci = f"[{_fmt(d.get('low'))}, {_fmt(d.get('high'))}]" if d.get("low") is not None else ""
            rows.append(f"<tr><td>{_esc(name)}</td><td>{_esc(s['task'])}</td><td>{s['n']}</td><td>{_esc(metric)}</td>"
                        f"<td>{_fmt(base)}</td><td data-source=\"{_esc(name)}\" data-metric=\"{_esc(metric)}\">{_fmt(s['tuned'][metric])}</td>"
                        f"<td>{ci}</td></tr>")
    heads = "".join(f"<li><b>{_esc(name)}</b>: {_esc(s['headline'])}</li>" for name, s in per.items())
    return ("<h2>Per task (data mixture)</h2><p>Each source's test records scored with its own task's metric.</p>"
            f"<ul>{heads}</ul><table><tr><th>source</th><th>task</th><th>n</th><th>metric</th><th>base</th><th>tuned</th>"
            f"<th>difference interval</th></tr>{''.join(rows)}</table>")
