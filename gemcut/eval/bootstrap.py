"""Paired bootstrap confidence interval of a metric difference (tuned minus base).

    from gemcut.eval.bootstrap import paired_bootstrap
    ci = paired_bootstrap(metric, tuned_results, base_results, n_resamples=1000, seed=0)
    ci["diff"], ci["low"], ci["high"]

Both models answered the same examples, so each resample draws one set of example indices and scores
both models on it (Koehn 2004, "Statistical Significance Tests for Machine Translation Evaluation",
https://aclanthology.org/W04-3250/). Pairing removes the variance that comes from which examples happened
to be in the test set, which is what lets a user tell a real gain from noise. The interval is the
percentile interval of the resampled differences. `metric` is any function from a list of per-example
results to a float; `paired_bootstrap_indexed` is the fast path for metrics that read numpy arrays through
an index array (no list rebuilt per resample).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def paired_bootstrap(metric: Callable[[Sequence], float], tuned: Sequence, base: Sequence, *, n_resamples: int = 1000,
                     seed: int | None = 0, confidence: float = 0.95) -> dict:
    """Confidence interval of metric(tuned) - metric(base) over aligned per-example results.

    Args:
        metric: list of per-example results -> float (for example a list of (true, predicted) pairs -> F1).
        tuned, base: per-example results of the two models, aligned (item i is the same example).
        n_resamples: bootstrap resamples; 0 returns the point estimate with no interval.
        seed: seeds the resampling, so the interval is reproducible.
        confidence: width of the percentile interval.
    Returns: see `paired_bootstrap_indexed`.
    """
    if len(tuned) != len(base):
        raise ValueError(f"paired bootstrap needs aligned results: {len(tuned)} tuned vs {len(base)} base")
    return paired_bootstrap_indexed(lambda idx: metric([tuned[i] for i in idx]), lambda idx: metric([base[i] for i in idx]),
                                    len(tuned), n_resamples=n_resamples, seed=seed, confidence=confidence)


def paired_bootstrap_indexed(tuned_metric: Callable[[np.ndarray], float], base_metric: Callable[[np.ndarray], float], n: int, *,
                             n_resamples: int = 1000, seed: int | None = 0, confidence: float = 0.95) -> dict:
    """The same interval, for metrics that read their per-example data through an index array (fast path).

    `tuned_metric(idx)` / `base_metric(idx)` compute the metric on examples `idx` (with repeats).
    Returns {tuned, base, diff, low, high, half_width, n, n_resamples, confidence}; low/high/half_width are
    None when n_resamples is 0 or n is 0. half_width = (high - low) / 2 is the "±" of the headline.
    """
    everything = np.arange(n)
    t_val = float(tuned_metric(everything)) if n else float("nan")
    b_val = float(base_metric(everything)) if n else float("nan")
    out = {"tuned": t_val, "base": b_val, "diff": t_val - b_val, "low": None, "high": None, "half_width": None,
           "n": n, "n_resamples": n_resamples, "confidence": confidence}
    if n_resamples == 0 or n == 0:
        return out
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    for b in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        diffs[b] = float(tuned_metric(idx)) - float(base_metric(idx))
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) == 0:
        return out
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    out.update(low=float(low), high=float(high), half_width=float((high - low) / 2))
    return out
