"""Duplicate detection: exact (a 64-bit hash of the normalised text) and near (MinHash LSH, datasketch).

    python -c "from gemcut.data.dedup import NearIndex; ix = NearIndex(0.8); \
ix.add('a', 'the quick brown fox jumps'); print(ix.query('the quick brown fox jumps!'))"

Only hashes and MinHash signatures are kept, never the texts, so a streamed corpus stays out of memory:
about 40 bytes per record for exact dedup, about 0.5 KB per record for the near-duplicate index.
Near duplicates compare 5-byte shingles of the lower-cased text (robust for short texts such as
tweets); `threshold` is the estimated Jaccard similarity above which two records count as near duplicates.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
from datasketch import LeanMinHash, MinHashLSH

NUM_PERM = 64  # signature length: enough for thresholds >= 0.5 at a fraction of the default's cost
SHINGLE = 5
_PERMS = None


def text_key(text: str) -> int:
    """A 64-bit fingerprint of a text (collisions are ~1e-9 likely even for a billion records)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def shingle_hashes(text: str) -> np.ndarray:
    """32-bit hashes of the distinct 5-byte shingles of the lower-cased, space-collapsed text (vectorised:
    a per-shingle Python hash call would dominate the cost on long documents)."""
    data = " ".join(text.lower().split()).encode("utf-8")
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint32)
    n = len(b) - SHINGLE + 1
    if n <= 0:
        return np.array([zlib.crc32(data)], dtype=np.uint32)
    h = np.full(n, 2166136261, dtype=np.uint32)
    for k in range(SHINGLE):  # FNV-1a over each window; uint32 arithmetic wraps by design
        h = (h ^ b[k:k + n]) * np.uint32(16777619)
    return np.unique(h)


def _fmix32(h: np.ndarray) -> np.ndarray:
    # MurmurHash3's finaliser: spreads the rolling hash's bits before the affine permutations.
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _permutations() -> tuple[np.ndarray, np.ndarray]:
    global _PERMS
    if _PERMS is None:  # affine maps a*h+b mod 2^32 with odd a (bijections), fixed seed: same signature every run
        rng = np.random.RandomState(1)
        a = (rng.randint(0, 2**31, NUM_PERM, dtype=np.int64) * 2 + 1).astype(np.uint32)
        b = rng.randint(0, 2**32, NUM_PERM, dtype=np.int64).astype(np.uint32)
        _PERMS = (a, b)
    return _PERMS


def minhash(text: str) -> LeanMinHash:
    """MinHash signature of a text (datasketch's affine32 construction, computed in one numpy expression:
    building a `MinHash` object per record cost more than the hashing itself)."""
    a, b = _permutations()
    hv = _fmix32(shingle_hashes(text))[:, None]
    sig = (hv * a[None, :] + b[None, :]).min(axis=0)
    return LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")


class ExactIndex:
    """Set of text fingerprints; `add` tells whether a text was new and which source first had it."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def __contains__(self, key: int) -> bool:
        return key in self.seen

    def add(self, key: int) -> bool:
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def __len__(self) -> int:
        return len(self.seen)


class NearIndex:
    """MinHash LSH over inserted texts; `query` returns the id of a near duplicate already inserted, or None."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.size = 0

    def query(self, text: str, sig: LeanMinHash | None = None) -> str | None:
        if self.size == 0:
            return None
        sig = sig if sig is not None else minhash(text)
        hits = self.lsh.query(sig)
        return min(hits) if hits else None

    def add(self, key: str, text: str, sig: LeanMinHash | None = None) -> None:
        self.lsh.insert(key, sig if sig is not None else minhash(text), check_duplication=False)
        self.size += 1

    def check_and_add(self, key: str, text: str) -> str | None:
        """Insert unless a near duplicate is already there; returns that duplicate's id (then nothing is inserted)."""
        sig = minhash(text)
        hit = self.query(text, sig)
        if hit is None:
            self.add(key, text, sig)
        return hit


class Deduplicator:
    """Exact then near deduplication of a record stream, counted. The first occurrence is kept.

    `raw_key` (the text before cleaning) is tracked too, so the report can say how many duplicates a plain
    comparison of the raw text finds versus how many exist after normalisation."""

    def __init__(self, exact: bool, near: bool, threshold: float):
        self.exact, self.near = exact, near
        self.raw = ExactIndex()
        self.keys = ExactIndex()
        self.near_index = NearIndex(threshold) if near else None
        self.labels: dict[int, str] = {}  # key -> label of the kept record, for label-conflict counts
        self.raw_duplicates = 0
        self.exact_removed = 0
        self.near_removed = 0
        self.label_conflicts = 0
        self.examples: list[dict] = []

    def seen_raw(self, raw_text: str) -> None:
        if not self.raw.add(text_key(raw_text)):
            self.raw_duplicates += 1

    def keep(self, record: dict, text: str) -> bool:
        key = text_key(text)
        if self.exact:
            if not self.keys.add(key):
                self.exact_removed += 1
                if "label" in record and self.labels.get(key, record["label"]) != record["label"]:
                    self.label_conflicts += 1
                self._example("exact", record)
                return False
            if "label" in record:
                self.labels[key] = record["label"]
        if self.near_index is not None:
            hit = self.near_index.check_and_add(f"{self.near_index.size}:{record['_source']}", text)
            if hit is not None:
                self.near_removed += 1
                self._example("near", record, hit)
                return False
        return True

    def _example(self, how: str, record: dict, kept_source: str | None = None) -> None:
        if len(self.examples) < 5:
            ex = {"type": how, "dropped": record.get("_source")}
            if kept_source:
                ex["near"] = kept_source.split(":", 1)[1]
            self.examples.append(ex)

    def summary(self) -> dict:
        return {
            "exact_before_normalization": self.raw_duplicates,
            "exact_removed": self.exact_removed,
            "near_removed": self.near_removed,
            "near_threshold": self.near_index.threshold if self.near_index else None,
            "label_conflicts": self.label_conflicts,
            "examples": self.examples,
        }


class LeakageCheck:
    """Evaluation records are added first; then each training record is checked for an exact or near
    duplicate among them (such a training record leaks the evaluation answer and is removed from train)."""

    def __init__(self, threshold: float, near: bool = True):
        self.exact: dict[int, str] = {}  # fingerprint -> split
        self.near = NearIndex(threshold) if near else None
        self.found = {"exact": {}, "near": {}}
        self.examples: list[dict] = []

    def add_eval(self, split: str, record: dict, text: str) -> None:
        self.exact.setdefault(text_key(text), split)
        if self.near is not None:
            self.near.add(f"{self.near.size}:{split}:{record.get('_source')}", text)

    def leaks(self, record: dict, text: str) -> bool:
        """True when this training record duplicates an evaluation record (counted, with a few examples)."""
        split = self.exact.get(text_key(text))
        how, other = ("exact", None) if split else (None, None)
        if how is None and self.near is not None:
            hit = self.near.query(text)
            if hit is not None:
                _, split, other = hit.split(":", 2)
                how = "near"
        if how is None:
            return False
        self.found[how][split] = self.found[how].get(split, 0) + 1
        if len(self.examples) < 5:
            self.examples.append({"type": how, "train": record.get("_source"), "split": split, **({"matches": other} if other else {})})
        return True

    def summary(self) -> dict:
        removed = sum(sum(v.values()) for v in self.found.values())
        return {"exact": self.found["exact"], "near": self.found["near"], "removed_from_train": removed,
                "near_checked": self.near is not None, "examples": self.examples}
