"""Fuzz the readers: any bytes, as JSONL, CSV or JSON, give records or a GemcutError, never another exception.

    python -m pytest -q tests/test_data_fuzz.py

Hypothesis draws raw bytes and, to reach past the parsers, near-valid files: JSON records made of the field
names gemcut knows, CSV rows under a header of them, in a few encodings. Each file goes through the reader
with the record checks (`read_source` + `Normalizer`, as `on_error: skip` does) and through `prepare`.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemcut.config import DataConfig
from gemcut.data.normalize import KNOWN_FIELDS, Normalizer
from gemcut.data.prepare import prepare
from gemcut.data.readers import read_source
from gemcut.errors import GemcutError

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = sorted(KNOWN_FIELDS | {"role", "content", "weight", "rank", "score", "id", "_x", "sender"})

keys = st.sampled_from(FIELDS) | st.text(max_size=4)
scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.sampled_from(["user", "assistant", "system", "bogus"])
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=20)
records = st.dictionaries(keys, json_values, max_size=5) | json_values
encodings = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])
# JSON that json.dumps never writes: nesting past the parser's depth, a key twice, NaN, a lone surrogate.
odd_json = (st.integers(500, 5000).map(lambda n: '{"text": ' + "[" * n + "]" * n + "}")
            | st.sampled_from(['{"text": "a", "text": "b"}', '{"prompt": "p", "completions": [{"text": "a", "score": NaN}, '
                               '{"text": "b", "score": Infinity}]}', '{"text": "\\ud800"}', '{"label": 1, "text": "\\u200b"}',
                               '{"x": {"a": 1, "a": 2}, oops}', '{"text": ["\\udfff", "\\ud83d\\ude00"]}',
                               '{"text": "a", "label": ' + "7" * 5000 + "}", '{"text": "a", "label": 1e999}']))


@st.composite
def jsonl_bytes(draw) -> bytes:
    lines = [json.dumps(r) for r in draw(st.lists(records, max_size=5))]
    lines += draw(st.lists(st.text(max_size=20) | odd_json, max_size=2))  # broken lines among the good
    draw(st.randoms()).shuffle(lines)
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return ending.join(lines).encode(draw(encodings), errors="replace")


@st.composite
def json_bytes(draw) -> bytes:
    text = json.dumps(draw(st.lists(records, max_size=5) | records), indent=draw(st.sampled_from([None, 1])))
    if draw(st.booleans()):
        text = "[" + draw(odd_json) + ", " + text[1:] if text.startswith("[") else text
    cut = draw(st.integers(0, len(text)))
    return (text if draw(st.booleans()) else text[:cut]).encode(draw(encodings), errors="replace")


@st.composite
def csv_bytes(draw) -> bytes:
    header = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4))
    cells = st.text(max_size=10) | st.sampled_from(['"', '""', ",", ";", "\r", "\n", "\x00"])
    rows = draw(st.lists(st.lists(cells, max_size=5), max_size=5))
    buf = io.StringIO()
    csv.writer(buf, delimiter=draw(st.sampled_from([",", ";"]))).writerows([header, *rows])
    text = buf.getvalue()
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # cut anywhere: inside a quote, a line ending
    return text.encode(draw(encodings), errors="replace")


def check(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(data)
        normalizer = Normalizer()
        try:
            for row in read_source(path):
                try:
                    normalizer.normalize(row)
                except GemcutError:
                    pass  # a bad record: on_error=skip counts it and goes on
        except GemcutError:
            pass  # a bad file
        for on_error in ("skip", "fail"):
            try:
                prepare(DataConfig(train=[str(path)], on_error=on_error, split={"validation": 0.2, "test": 0}))
            except GemcutError:
                pass


@FUZZ
@given(st.binary(max_size=600) | jsonl_bytes())
def test_jsonl_reader_never_raises_anything_else(data):
    check(data, ".jsonl")


@FUZZ
@given(st.binary(max_size=600) | json_bytes())
def test_json_reader_never_raises_anything_else(data):
    check(data, ".json")


@FUZZ
@given(st.binary(max_size=600) | csv_bytes())
def test_csv_reader_never_raises_anything_else(data):
    check(data, ".csv")
