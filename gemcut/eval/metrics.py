"""Metric functions over per-example results, computed with the libraries people trust.

    from gemcut.eval.metrics import classification_metrics, generation_metrics, perplexity
    classification_metrics(["pos", "neg"], ["pos", None], labels=["neg", "pos"])

- classification: accuracy, per-class precision/recall/F1/support, macro and weighted averages, and the
  confusion matrix (scikit-learn). A prediction of `None` is an unparseable answer: it is always wrong,
  it is counted (`unparseable`), and it has its own last column in the confusion matrix (rows are the
  true labels, columns the predicted labels then "unparseable"), so nothing is silently scored.
- generation: exact match (after stripping surrounding whitespace), ROUGE-1/2/L F-measure (rouge-score,
  with stemming), corpus BLEU (sacrebleu, 0-100 scale).
- perplexity: exp(summed NLL / token count) over all examples, so long references weigh by their tokens.
- pairwise accuracy: the fraction of preference pairs where the chosen answer scores above the rejected.

The `*_fast` functions compute the same numbers with numpy for the bootstrap, which calls a metric
hundreds of times; the tests check they agree with scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

UNPARSEABLE = "unparseable"


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, per-class and averaged precision/recall/F1, and the confusion matrix.

    `y_pred` items are label names or None (unparseable). Returns a JSON-ready dict:
    accuracy, macro_precision, macro_recall, macro_f1, weighted_precision, weighted_recall, weighted_f1,
    unparseable (count), n, per_class {label: {precision, recall, f1, support}},
    confusion {labels: rows, columns: labels + ["unparseable"], matrix: [[int]]}.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    if UNPARSEABLE in labels:
        raise ValueError(f"a label may not be named {UNPARSEABLE!r}: that name marks answers that match no label")
    unknown = sorted({t for t in y_true if t not in labels})
    if unknown:
        raise ValueError(f"true labels {unknown} are not in the label set {labels}")
    pred = [UNPARSEABLE if p is None else p for p in y_pred]
    columns = labels + [UNPARSEABLE]
    n = len(y_true)
    out: dict = {"n": n, "unparseable": sum(p == UNPARSEABLE for p in pred)}
    if n == 0:
        return out | {"accuracy": float("nan"), "per_class": {}, "confusion": {"labels": labels, "columns": columns, "matrix": []}}
    out["accuracy"] = float(accuracy_score(y_true, pred))
    # Averages run over the real labels only: "unparseable" is never a class to be good at, and an answer
    # mapped to it still lowers the true class's recall.
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, lab in enumerate(labels)}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, pred, labels=labels, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(ap), float(ar), float(af)
    cm = confusion_matrix(y_true, pred, labels=columns)
    out["confusion"] = {"labels": labels, "columns": columns, "matrix": cm[: len(labels)].tolist()}
    return out


def _counts(true_idx: np.ndarray, pred_idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, predicted counts and true counts per class; pred index k means unparseable."""
    tp = np.bincount(true_idx[true_idx == pred_idx], minlength=k)[:k]
    predicted = np.bincount(pred_idx, minlength=k + 1)[:k]
    support = np.bincount(true_idx, minlength=k)[:k]
    return tp, predicted, support


def macro_f1_fast(true_idx: np.ndarray, pred_idx: np.ndarray, k: int) -> float:
    """Macro F1 from integer class indices (pred == k is unparseable); equals scikit-learn's with zero_division=0."""
    tp, predicted, support = _counts(true_idx, pred_idx, k)
    denom = predicted + support
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def weighted_f1_fast(true_idx: np.ndarray, pred_idx: np.ndarray, k: int) -> float:
    tp, predicted, support = _counts(true_idx, pred_idx, k)
    denom = predicted + support
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float((f1 * support).sum() / max(support.sum(), 1))


def accuracy_fast(true_idx: np.ndarray, pred_idx: np.ndarray, k: int | None = None) -> float:
    return float((true_idx == pred_idx).mean()) if len(true_idx) else float("nan")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if not predictions:
        return float("nan")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Per-example ROUGE-1/2/L F-measures (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = []
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)  # score(target, prediction)
        rows.append({k: float(v.fmeasure) for k, v in s.items()})
    return rows


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, exponential smoothing), on the 0-100 scale."""
    import sacrebleu

    if not predictions:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-example BLEU sufficient statistics (sacrebleu's own, as its significance tests use), [N, 2 + 2*4].

    Summing rows over any subset and passing the sum to `bleu_from_stats` gives that subset's corpus BLEU,
    which is what makes a bootstrap of BLEU cheap.
    """
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    return np.asarray(metric._extract_corpus_statistics(list(predictions), [list(references)]), dtype=np.int64)


def bleu_from_stats(stats_sum: np.ndarray) -> float:
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats([int(x) for x in stats_sum]).score)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """exact_match, rouge1, rouge2, rougeL (means of per-example F-measures), bleu, n."""
    out = {"n": len(predictions), "exact_match": exact_match(predictions, references), "bleu": bleu(predictions, references)}
    rows = rouge_scores(predictions, references)
    for key in ("rouge1", "rouge2", "rougeL"):
        out[key] = float(np.mean([r[key] for r in rows])) if rows else float("nan")
    return out


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(sum of per-example summed NLL / sum of their token counts); NaN when no tokens were scored."""
    tokens = float(np.sum(token_counts)) if len(token_counts) else 0.0
    if tokens == 0:
        return float("nan")
    return float(math.exp(float(np.sum(nll_sums)) / tokens))


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Fraction of pairs where chosen scores strictly above rejected (a tie counts as wrong)."""
    if not len(chosen_scores):
        return float("nan")
    c, r = np.asarray(chosen_scores, dtype=float), np.asarray(rejected_scores, dtype=float)
    return float((c > r).mean())
