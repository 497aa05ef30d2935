"""Turn per-example results of the tuned (and base) model into metrics, deltas and bootstrap intervals.

    python -m pytest -q tests/test_eval_summary.py

Pure functions, no model: `evaluate.py` fills a `ModelResults` per model with what `scoring.py` returned
and calls `summarise`. Every metric that gets a delta is computed from per-example arrays through an
index array, so the paired bootstrap (bootstrap.py) resamples examples, not numbers already averaged.

Headline metric per task: macro-F1 for classification (head or generative), ROUGE-L for generation,
perplexity for plain text, pairwise accuracy for preference data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gemcut.eval import metrics as M
from gemcut.eval.bootstrap import paired_bootstrap_indexed

HEADLINE = {"classification": "macro_f1", "generative_classification": "macro_f1", "generation": "rougeL",
            "language_modeling": "perplexity", "preference": "pairwise_accuracy"}
LOWER_IS_BETTER = {"perplexity", "loss", "unparseable_rate"}
# How the headline writes each headline metric.
SHOWN = {"macro_f1": "macro-F1", "rougeL": "ROUGE-L", "perplexity": "perplexity", "pairwise_accuracy": "pairwise accuracy"}


@dataclass
class ModelResults:
    """Per-example outputs of one model, aligned with the examples (only the fields the task uses are set).

    predictions: label per example (None = unparseable); texts: generated answers; nll: (summed NLL, tokens)
    of each reference; chosen/rejected: preference scores; rules: how generated answers were mapped to labels.
    """

    predictions: list[str | None] | None = None
    texts: list[str] | None = None
    nll: list[tuple[float, int]] | None = None
    chosen: list[float] | None = None
    rejected: list[float] | None = None
    rules: dict[str, int] | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def metric_functions(task: str, references: list[str], labels: list[str], r: ModelResults) -> dict[str, Callable[[np.ndarray], float]]:
    """name -> f(idx) for every metric of the task that can be resampled."""
    fns: dict[str, Callable[[np.ndarray], float]] = {}
    if r.predictions is not None:
        index = {lab: i for i, lab in enumerate(labels)}
        k = len(labels)
        true = np.array([index[t] for t in references], dtype=np.int64)
        pred = np.array([k if p is None else index[p] for p in r.predictions], dtype=np.int64)
        fns["accuracy"] = lambda idx: M.accuracy_fast(true[idx], pred[idx])
        fns["macro_f1"] = lambda idx: M.macro_f1_fast(true[idx], pred[idx], k)
        fns["weighted_f1"] = lambda idx: M.weighted_f1_fast(true[idx], pred[idx], k)
        unparse = (pred == k).astype(float)
        fns["unparseable_rate"] = lambda idx: float(unparse[idx].mean())
    if r.texts is not None and task == "generation":
        em = np.array([p.strip() == ref.strip() for p, ref in zip(r.texts, references)], dtype=float)
        fns["exact_match"] = lambda idx: float(em[idx].mean())
        rows = M.rouge_scores(r.texts, references)
        for key in ("rouge1", "rouge2", "rougeL"):
            arr = np.array([row[key] for row in rows], dtype=float)
            fns[key] = lambda idx, arr=arr: float(arr[idx].mean())
        stats = M.bleu_stats(r.texts, references)
        fns["bleu"] = lambda idx: M.bleu_from_stats(stats[idx].sum(axis=0))
    if r.nll is not None:
        nll = np.array([x[0] for x in r.nll], dtype=float)
        tok = np.array([x[1] for x in r.nll], dtype=float)
        # Mean loss per target token (per example for a classifier head): what training logs as val_loss.
        fns["loss"] = lambda idx: float(nll[idx].sum() / tok[idx].sum()) if tok[idx].sum() else float("nan")
        if task != "classification":
            fns["perplexity"] = lambda idx: M.perplexity(nll[idx], tok[idx])
    if r.chosen is not None:
        wins = (np.asarray(r.chosen, dtype=float) > np.asarray(r.rejected, dtype=float)).astype(float)
        fns["pairwise_accuracy"] = lambda idx: float(wins[idx].mean())
    return fns


def model_metrics(task: str, references: list[str], labels: list[str], r: ModelResults) -> dict:
    """All metrics of one model (point values), plus per-class figures and the confusion matrix."""
    out: dict = {name: fn(np.arange(len(references))) if references else float("nan")
                 for name, fn in metric_functions(task, references, labels, r).items()}
    if r.predictions is not None:
        cls = M.classification_metrics(references, r.predictions, labels)
        out.update({k: v for k, v in cls.items() if k not in ("per_class", "confusion")})
        out["per_class"], out["confusion"] = cls["per_class"], cls["confusion"]
        out["label_mapping"] = r.rules
    if r.nll is not None:
        out["nll_tokens"] = int(sum(x[1] for x in r.nll))
    out["n"] = len(references)
    out["seconds"] = round(r.seconds, 3)
    return out


def summarise(task: str, references: list[str], labels: list[str], tuned: ModelResults, base: ModelResults | None, *,
              n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Metrics of both models and, with a base, the tuned-minus-base difference of each with its interval.

    Returns {task, headline_metric, tuned: {...}, base: {...} | None, deltas: {metric: interval} }.
    """
    out = {"task": task, "headline_metric": HEADLINE[task], "tuned": model_metrics(task, references, labels, tuned),
           "base": None, "deltas": {}}
    if base is None:
        return out
    out["base"] = model_metrics(task, references, labels, base)
    t_fns = metric_functions(task, references, labels, tuned)
    b_fns = metric_functions(task, references, labels, base)
    for name in t_fns:
        if name in b_fns:
            ci = paired_bootstrap_indexed(t_fns[name], b_fns[name], len(references), n_resamples=n_resamples, seed=seed,
                                          confidence=confidence)
            ci["higher_is_better"] = name not in LOWER_IS_BETTER
            out["deltas"][name] = ci
    return out


def headline_text(summary: dict) -> str:
    """"macro-F1 0.31 -> 0.70 (+0.39 ± 0.02)", or the tuned value alone when there is no base."""
    name = summary["headline_metric"]
    shown = SHOWN.get(name, name)
    tuned = summary["tuned"].get(name)
    d = summary["deltas"].get(name)
    if d is None:
        return f"{shown} {fmt_value(tuned)}"
    pm = f" ± {d['half_width']:.2f}" if d.get("half_width") is not None else ""
    return f"{shown} {fmt_value(d['base'])} -> {fmt_value(d['tuned'])} ({d['diff']:+.2f}{pm})"


def fmt_value(x) -> str:
    """A headline number with two decimals, "n/a" for None or a non-finite value."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.2f}"
