"""Deterministic train/validation/test splits by a stable record id, stratified by label where records have one.

    python -c "from gemcut.data.split import split_records; from gemcut.config import SplitConfig; \
print({k: len(v) for k, v in split_records([{'text': str(i), 'label': 'ab'[i % 2], '_id': f'x.csv:{i}'} \
for i in range(100)], SplitConfig()).items()})"

Every record has an id: its file's path relative to the `data.train` entry it came from, and its position
(`notes/a.jsonl:17`, `trivia.yml:35`, `dataset.json:1#<conversation id>`); records made from one row (a
ranked list's pairs) share it. A record goes to a split by a seeded hash of that id (`position`), never of
its text, so changing the cleaning settings, or moving the folder, does not move records between splits.
An exact duplicate (kept when `clean.dedup_exact` is off) takes the id of its first copy, so copies share a
split; near duplicates across splits are removed from train by the leakage check (prepare.py).

In memory (`split_records`): within each label (when stratified), the ids are ordered by their hash and the
first `validation` share goes to validation, the next `test` share to test, the rest to train (rounded per
label, a tiny class keeping a training record), so every split keeps the label balance. Only a change in
which records exist (cleaning that drops more or fewer) moves records, and only those at the cut. Each split
comes out in hash order, so `data.limit` (the first N of train) is a seeded random, stratified sample.

Streaming (`bucket`): a `text` corpus is never held, so each record's split is its hash against the ratios:
the ratios hold in expectation (the report gives the real counts).

Either way, no source file goes whole to validation/test (`keep_a_record_per_file`): when all of a file's
records drew an evaluation split, the one with the highest hash goes to train instead. A file of one record
(a .txt or .md document) is a record like any other in a run of `SMALL_RUN_FILES` files or more, so a folder
of many documents still gets validation and test documents; in a smaller run each file is a large share of
the data and trains.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from gemcut.config import SplitConfig

SPLITS = ("train", "validation", "test")
SMALL_RUN_FILES = 20  # below this many source files, even a one-record file is never given whole to evaluation


def _take(n: int, frac: float) -> int:
    return int(round(n * frac))


def position(key: str, seed: int) -> float:
    """Where a record id falls in [0, 1), by a seeded hash: the same id and seed always give the same value."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def record_id(record: dict) -> str:
    """The split id of a record: `_id` (set by prepare), else `_source`."""
    return record.get("_id") or record["_source"]


def split_records(records: list[dict], cfg: SplitConfig, *, stratify_by: str | None = "label",
                  make: tuple[str, ...] = ("validation", "test"), stats: dict | None = None) -> dict[str, list[dict]]:
    """Split records into train and the evaluation splits named in `make` (others get no records). `stats`,
    when given, receives `files_kept_in_train` (see `keep_a_record_per_file`)."""
    fracs = {"validation": cfg.validation if "validation" in make else 0.0, "test": cfg.test if "test" in make else 0.0}
    use_label = cfg.stratify and stratify_by is not None and any(stratify_by in r for r in records[:1])
    groups: dict[str, dict[str, list[dict]]] = defaultdict(dict)  # label -> id -> records
    for r in records:
        groups[str(r.get(stratify_by)) if use_label else ""].setdefault(record_id(r), []).append(r)
    where: dict[str, str] = {}
    for label in sorted(groups):
        ids = sorted(groups[label], key=lambda k: (position(k, cfg.seed), k))
        n = len(ids)
        n_val, n_test = _take(n, fracs["validation"]), _take(n, fracs["test"])
        # A tiny class keeps at least one training example when it can.
        while n_val + n_test >= n and n > 0 and (n_val or n_test):
            if n_test >= n_val and n_test:
                n_test -= 1
            else:
                n_val -= 1
        for i, k in enumerate(ids):
            where[k] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
    kept = keep_a_record_per_file(where, records, cfg.seed) if make else 0
    if stats is not None:
        stats["files_kept_in_train"] = kept
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in sorted(records, key=lambda r: (position(record_id(r), cfg.seed), record_id(r))):
        out[where[record_id(r)]].append(r)
    return out


def keep_a_record_per_file(where: dict[str, str], records: list[dict], seed: int) -> int:
    """Move to train, for each file (`_file`) whose every record drew validation or test, the id with the
    highest hash. Changes `where` (id -> split) in place; returns how many files were kept so."""
    files: dict[str, list[str]] = defaultdict(list)
    for r in records:
        if "_file" in r:
            files[r["_file"]].append(record_id(r))
    kept, small = 0, len(files) < SMALL_RUN_FILES
    for ids in files.values():
        if (len(ids) > 1 or small) and all(where[k] != "train" for k in ids):
            where[max(ids, key=lambda k: (position(k, seed), k))] = "train"
            kept += 1
    return kept


def bucket(key: str, cfg: SplitConfig, make: tuple[str, ...] = ("validation", "test")) -> str:
    """The split of one streamed record, from the seeded hash of its id."""
    u = position(key, cfg.seed)
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
    how = "seeded hash of each record's id (file and line)"
    method = f"{how}, streaming" if streaming else (f"{how}, stratified by label" if stratified else how)
    parts.append(f"ratios validation={cfg.validation}, test={cfg.test}, seed={cfg.seed}, {method}")
    return "; ".join(parts)
