"""An uploaded file checked by the data pipeline: `processed` with its record kind and counts, or `error`
naming its first bad lines, so that `client.files.wait_for_processing` has a verdict to wait for.

    python -m pytest -q tests/test_service_uploads.py
    python -c "from pathlib import Path; from gemcut.service.uploads import validate_upload; \
print(validate_upload(Path('chat.jsonl'), 'chat.jsonl', purpose='fine-tune'))"

Nothing here parses by itself: the pipeline's JSONL reader and `Normalizer` (gemcut/data/readers.py,
normalize.py) find the bad lines, in file order, and `prepare` (gemcut/data/prepare.py) counts what a run
would train on (records, bad lines, cleaning, duplicates, encodings) exactly as `gemcut data check` does.
Files are read as JSON text only: nothing in them is executed or unpickled.

The accepted formats are the pipeline's: OpenAI chat SFT (`messages`, assistant `weight`, `tools`), OpenAI
DPO (`input` / `preferred_output` / `non_preferred_output`), OpenAI reinforcement rows (a conversation that
may end with the user's turn, plus extra top-level keys for the grader's `{{item.x}}`: read with
`data.extra_fields: keep` and `data.prompts_only` when the strict reading finds nothing else wrong; their
names in `counts["item_fields"]`, the conversations without a reply in `counts["without_reply"]`), and
gemcut's own kinds (text, label, prompt_completion, preference).
Purpose `fine-tune` takes JSONL only, OpenAI's rule; the client's file name, never the server's storage
path, appears in every message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from gemcut.config import DataConfig, SplitConfig
from gemcut.data import report as reportlib
from gemcut.data.normalize import ITEM, Normalizer
from gemcut.data.prepare import prepare
from gemcut.data.readers import FORMAT_BY_SUFFIX, read_source
from gemcut.errors import DataError, GemcutError

FINE_TUNE = "fine-tune"
SHOWN_BAD_LINES = 5  # bad lines named in status_details; the rest are counted
JSONL_RULE = "purpose 'fine-tune' takes JSONL only (OpenAI's rule): one JSON object per line, one example each"
# The file formats gemcut reads besides JSONL, by suffix: a file named so is not JSONL, and is refused unread.
OTHER_FORMATS = {suffix: fmt for suffix, fmt in FORMAT_BY_SUFFIX.items() if fmt not in ("jsonl", "json", "text")}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RowRules(Enum):
    """How rows are read: STRICT, as supervised and DPO runs read them (an unknown field is a likely typo; a
    conversation needs a reply); REINFORCEMENT, as OpenAI's reinforcement rows are written (other top-level
    fields kept as the row's item for the grader, `data.extra_fields: keep`; a conversation may end with the
    user's turn, `data.prompts_only`)."""

    STRICT = {}
    REINFORCEMENT = {"extra_fields": "keep", "prompts_only": True}


# Bad-line reasons that reinforcement rows are allowed (an unknown top-level field is also one: see BadLines.add).
REINFORCEMENT_ONLY_REASONS = ("no_assistant_turn",)


@dataclass(frozen=True)
class UploadCheck:
    """The verdict on one upload. `kind`: the record kind the pipeline found (messages, preference, label,
    text, prompt_completion), None when it found none. `counts`: what the data report says (see `counts_of`)."""

    status: Literal["processed", "error"]
    status_details: str | None = None
    kind: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)


def display_name(filename: str) -> str:
    """The client's file name as messages show it: its last part, without control characters, at most 255."""
    name = _CONTROL.sub("?", Path(filename.replace("\\", "/")).name) or "upload"
    return name[:255]


def validate_upload(path: Path, filename: str, *, purpose: str) -> UploadCheck:
    """Check the uploaded bytes at `path` (the server's own file) as training data; `filename` is the client's."""
    if not path.is_file():  # the server's fault, not the file's: the caller logs it
        raise FileNotFoundError(f"the stored upload {path} is missing")
    shown = display_name(filename)
    if purpose != FINE_TUNE:
        return _error(f"{shown}: purpose {purpose!r} is not one this server trains on; upload training data with purpose='fine-tune'")
    suffix = Path(shown).suffix.lower()
    if suffix in OTHER_FORMATS:
        return _error(f"{shown}: {JSONL_RULE}; this file is named as {OTHER_FORMATS[suffix]} ({suffix}): convert it to JSONL")
    strict = find_bad_lines(path, shown)
    if strict.rows == 0:
        return _error(f"{shown}: the file holds no records (it is empty or blank); {JSONL_RULE}", counts={"rows": 0})
    if not strict.bad:
        return _report(path, shown, rows=RowRules.STRICT)
    if strict.could_be_reinforcement_rows():
        # Extra fields and conversations without a reply are what OpenAI's reinforcement rows are made of.
        loose = find_bad_lines(path, shown, RowRules.REINFORCEMENT)
        if not loose.bad:
            return _report(path, shown, rows=RowRules.REINFORCEMENT)
        return _error(loose.describe(shown), kind=loose.kind, counts=loose.counts())
    details = strict.describe(shown)
    if strict.first_is_not_json():
        details += f"\n({JSONL_RULE})"
    return _error(details, kind=strict.kind, counts=strict.counts())


def _error(details: str, *, kind: str | None = None, counts: dict | None = None) -> UploadCheck:
    return UploadCheck("error", details, kind, counts or {})


# ---------------------------------------------------------------- the bad lines, in file order


@dataclass
class BadLine:
    line: int | None
    field: str | None
    reason: str
    message: str  # without the "file:line: " prefix


@dataclass
class BadLines:
    """What one read of a file through the reader and the normalizer found: every bad line (reason counted,
    the first few kept), the rows read and the record kind."""

    rows: int = 0
    bad: int = 0
    first: list[BadLine] = field(default_factory=list)
    by_reason: dict[str, int] = field(default_factory=dict)
    kind: str | None = None
    other_reasons: bool = False  # a bad line that no way of reading rows accepts

    def add(self, err: DataError, shown: str, path: Path) -> None:
        self.bad += 1
        self.by_reason[err.reason] = self.by_reason.get(err.reason, 0) + 1
        top_level_field = err.reason == "extra_field" and err.field is not None and not re.search(r"[.\[]", err.field)
        if not (top_level_field or err.reason in REINFORCEMENT_ONLY_REASONS):
            self.other_reasons = True
        if len(self.first) < SHOWN_BAD_LINES:
            text = _scrub(str(err), path, shown)  # readers name the file by `shown`, but a missing file by its path
            prefix = f"{shown}:{err.line}: "
            self.first.append(BadLine(err.line, err.field, err.reason, text.removeprefix(prefix).removeprefix(f"{shown}: ")))

    def could_be_reinforcement_rows(self) -> bool:
        """Whether every bad line is an unknown top-level field or a conversation without a reply."""
        return self.bad > 0 and not self.other_reasons

    def first_is_not_json(self) -> bool:
        return bool(self.first) and self.first[0].line == 1 and self.first[0].reason == "malformed_json"

    def describe(self, shown: str) -> str:
        """`name: 3 of 40 lines are not valid training examples:` and one line per bad line, then the rest counted."""
        what = "is not a valid training example" if self.bad == 1 else "are not valid training examples"
        head = f"{shown}: {self.bad} of {self.rows} lines {what}:"
        lines = [head]
        for b in self.first:
            named = b.field and b.field in b.message
            where = f"line {b.line}: " if b.line is not None else ""
            lines.append(where + (b.message if named or not b.field else f"field `{b.field}`: {b.message}"))
        rest = self.bad - len(self.first)
        if rest:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items(), key=lambda kv: -kv[1]))
            lines.append(f"... and {rest} more bad line{'s' if rest != 1 else ''} (all {self.bad} by reason: {reasons})")
        return "\n".join(lines)

    def counts(self) -> dict:
        return {"rows": self.rows, "bad_lines": self.bad, "bad_by_reason": dict(self.by_reason)}


def find_bad_lines(path: Path, shown: str, rows: RowRules = RowRules.STRICT) -> BadLines:
    """Every line of the JSONL file at `path` read and normalised as training records by `rows`' rules, with
    messages naming `shown`; nothing is cleaned or kept (that is `prepare`'s part)."""
    found = BadLines()
    normalizer = Normalizer("auto", **rows.value)
    try:
        for row in read_source(path, "jsonl", display=shown, fallbacks=tuple(DataConfig().fallback_encodings)):
            found.rows += 1
            try:
                normalizer.normalize(row)
            except DataError as err:
                found.add(err, shown, path)
    except DataError as err:  # a file the reader cannot open at all
        found.rows = max(found.rows, 1)
        found.add(err, shown, path)
    found.kind = None if normalizer.kind == "auto" else normalizer.kind
    return found


# ---------------------------------------------------------------- the data report of a good file


def upload_data_config(path: Path, rows: RowRules = RowRules.STRICT) -> DataConfig:
    """The data section that checks an upload as a run would read it (JSONL, the pipeline's cleaning), with no
    split: the job decides that. Bad records are skipped and counted, so the report counts all of them."""
    return DataConfig(train=[str(path)], format="jsonl", on_error="skip", split=SplitConfig(validation=0, test=0), **rows.value)


def _report(path: Path, shown: str, *, rows: RowRules) -> UploadCheck:
    try:
        prepared = prepare(upload_data_config(path, rows))
    except GemcutError as err:
        return _error(f"{shown}: {_scrub(str(err), path, shown)}")
    report = _scrub(prepared.report, path, shown)
    counts = counts_of(report)
    if rows is RowRules.REINFORCEMENT:
        records = prepared.splits["train"]
        counts["item_fields"] = sorted({k for r in records for k in r.get(ITEM, {})})
        counts["without_reply"] = sum(1 for r in records if "messages" in r and not any(m["role"] == "assistant" for m in r["messages"]))
    return UploadCheck("processed", None, prepared.kind, counts)


def counts_of(report: dict) -> dict:
    """The data report's numbers that say what a job would train on: rows read, valid records, records left
    after cleaning and deduplication, what was skipped and why, encodings, labels, warnings."""
    records, cleaning, dups = report["records"], report["cleaning"], report["duplicates"]
    skipped = {**report["errors"]["by_reason"], **cleaning["dropped"]}
    if dups["exact_removed"]:
        skipped["exact_duplicate"] = dups["exact_removed"]
    if dups["near_removed"]:
        skipped["near_duplicate"] = dups["near_removed"]
    source = report["sources"][0] if report["sources"] else {}
    counts = {
        "rows": records["rows_read"], "records": records["records_valid"], "examples": records["final"],
        "skipped": skipped, "mojibake_repaired": cleaning["mojibake_repaired"],
        "lines_by_encoding": source.get("lines_by_encoding", {}), "fallback_lines": source.get("fallback_lines", 0),
        "blank_lines": source.get("blank_lines", 0), "content_hash": report["content_hash"],
        # Warnings without the split's: an upload is checked unsplit, the job splits it.
        "warnings": reportlib.finish({**report, "splits": {}})["warnings"],
    }
    if report.get("labels"):
        counts["labels"] = report["labels"]["after_cleaning"]["counts"]
    return counts


def _scrub(value: Any, path: Path, shown: str) -> Any:
    """`value` with the server's storage path replaced by the client's file name, in every string."""
    if isinstance(value, str):
        return value.replace(str(path), shown)
    if isinstance(value, dict):
        return {_scrub(k, path, shown): _scrub(v, path, shown) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, path, shown) for v in value]
    return value
