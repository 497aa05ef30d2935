"""What evaluation writes into the run folder: eval.json's samples, eval_predictions.jsonl's lines, and valid JSON.

    python -m pytest -q tests/test_eval_run.py

`samples` puts the first examples side by side (prompt, reference, base and tuned answers) for eval.json
and report.html; `predictions_lines` gives one line per example for eval_predictions.jsonl; `write_json`
writes NaN and infinity as null, which JSON has no words for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gemcut.eval.examples import Example
from gemcut.eval.summary import ModelResults


def samples(examples: list[Example], tuned: ModelResults, base: ModelResults | None, n: int) -> list[dict]:
    """The first n examples side by side: prompt, reference, base and tuned answers."""
    def answer(r: ModelResults | None, i: int):
        if r is None:
            return None
        if r.texts is not None:
            return r.texts[i]
        if r.predictions is not None:
            return r.predictions[i] if r.predictions[i] is not None else "(unparseable)"
        if r.nll is not None and r.nll[i][1]:
            return f"perplexity {math.exp(r.nll[i][0] / r.nll[i][1]):.2f}"
        if r.chosen is not None:
            return f"chosen {r.chosen[i]:.3f} vs rejected {r.rejected[i]:.3f}"
        return None

    out = []
    for i, e in enumerate(examples[:n]):
        prompt = e.prompt[-1]["content"] if e.prompt else (e.text or "")
        row = {"source": e.source, "prompt": prompt, "reference": e.reference, "base": answer(base, i), "tuned": answer(tuned, i)}
        if tuned.predictions is not None and tuned.texts is not None:
            row["tuned_label"] = tuned.predictions[i]
            row["base_label"] = base.predictions[i] if base is not None else None
        out.append(row)
    return out


def predictions_lines(examples: list[Example], tuned: ModelResults, base: ModelResults | None,
                      baselines: dict[str, ModelResults] | None = None) -> list[dict]:
    """One row per example: source, reference, and each model's answer (`tuned_label`, `base_text`, ...); a
    baseline's under its name (`zero_shot_label`, `tfidf_label`, `k_shot_text`), so every number of the
    report can be recomputed from this file."""
    lines = []
    for i, e in enumerate(examples):
        row: dict = {"source": e.source, "reference": e.reference}
        for name, r in (("tuned", tuned), ("base", base), *(baselines or {}).items()):
            if r is None:
                continue
            if r.texts is not None:
                row[f"{name}_text"] = r.texts[i]
            if r.predictions is not None:
                row[f"{name}_label"] = r.predictions[i]
            if r.nll is not None:
                row[f"{name}_nll"], row[f"{name}_tokens"] = r.nll[i]
            if r.chosen is not None:
                row[f"{name}_chosen"], row[f"{name}_rejected"] = r.chosen[i], r.rejected[i]
        lines.append(row)
    return lines


def json_default(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def clean_floats(obj):
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_floats(v) for v in obj]
    return obj


def write_json(path: Path, obj, indent: int | None = 2) -> None:
    """`obj` as JSON in `path`, NaN and infinity as null, numpy and torch scalars as numbers."""
    path.write_text(json.dumps(clean_floats(obj), indent=indent, default=json_default))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line (NaN and infinity as null)."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(clean_floats(row), default=json_default) + "\n")
