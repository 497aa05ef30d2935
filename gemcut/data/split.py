"""Deterministic train/validation/test splits, stratified by label where records have one.

    python -c "from gemcut.data.split import split_records; from gemcut.config import SplitConfig; \
print({k: len(v) for k, v in split_records([{'text': str(i), 'label': 'ab'[i % 2]} for i in range(100)], SplitConfig()).items()})"

In memory (`split_records`): records are shuffled with `random.Random(seed)`; with stratification each
label's records are split by the ratios separately (rounded per label), so every split keeps the label
balance. The order inside each split is that seeded shuffle, so `data.limit` (the first N of train) is a
random, stratified sample rather than the head of the file.

Streaming (`bucket`): a `text` corpus is never held, so each record goes to a split by a seeded hash of
its text: the same corpus and seed give the same split, exact duplicates always share a split, and the
ratios hold in expectation (the report gives the real counts).
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict

from gemcut.config import SplitConfig

SPLITS = ("train", "validation", "test")


def _take(n: int, frac: float) -> int:
    return int(round(n * frac))


def split_records(records: list[dict], cfg: SplitConfig, *, stratify_by: str | None = "label",
                  make: tuple[str, ...] = ("validation", "test")) -> dict[str, list[dict]]:
    """Split records into train and the evaluation splits named in `make` (others get no records)."""
    rng = random.Random(cfg.seed)
    fracs = {"validation": cfg.validation if "validation" in make else 0.0, "test": cfg.test if "test" in make else 0.0}
    groups: dict[str, list[dict]] = defaultdict(list)
    use_label = cfg.stratify and stratify_by is not None and any(stratify_by in r for r in records[:1])
    for r in records:
        groups[str(r.get(stratify_by)) if use_label else ""].append(r)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label in sorted(groups):
        group = list(groups[label])
        rng.shuffle(group)
        n = len(group)
        n_val, n_test = _take(n, fracs["validation"]), _take(n, fracs["test"])
        # A tiny class keeps at least one training example when it can.
        while n_val + n_test >= n and n > 0 and (n_val or n_test):
            if n_test >= n_val and n_test:
                n_test -= 1
            else:
                n_val -= 1
        out["validation"] += group[:n_val]
        out["test"] += group[n_val:n_val + n_test]
        out["train"] += group[n_val + n_test:]
    for name in SPLITS:  # interleave the labels again (seeded), so no split is sorted by class
        rng.shuffle(out[name])
    return out


def bucket(key: int, cfg: SplitConfig, make: tuple[str, ...] = ("validation", "test")) -> str:
    """The split of one streamed record, from a seeded hash of its text fingerprint."""
    h = hashlib.blake2b(f"{cfg.seed}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    val = cfg.validation if "validation" in make else 0.0
    test = cfg.test if "test" in make else 0.0
    if u < val:
        return "validation"
    if u < val + test:
        return "test"
    return "train"


def describe(cfg: SplitConfig, stratified: bool, streaming: bool, from_files: tuple[str, ...]) -> str:
    parts = []
    if from_files:
        parts.append(f"{', '.join(from_files)} from the given files")
    method = "seeded hash of the text (streaming)" if streaming else ("stratified by label" if stratified else "seeded shuffle")
    parts.append(f"ratios validation={cfg.validation}, test={cfg.test}, seed={cfg.seed}, {method}")
    return "; ".join(parts)
