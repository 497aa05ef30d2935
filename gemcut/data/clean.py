"""Cleaning: optional, counted steps applied to every text field of a record.

    python -c "from gemcut.data.clean import Cleaner; from gemcut.config import CleanConfig; \
c = Cleaner(CleanConfig()); print(c.clean({'text': 'caf\u00c3\u00a9 &amp; <b>bar</b>'}), dict(c.changed))"

Steps, in order (each switched by `data.clean.*`, each counting the records it changed):
1. `fix_mojibake` — ftfy repairs text decoded with the wrong encoding (and C1 controls, surrogates);
   records that still look garbled afterwards are counted as `mojibake_suspect` (ftfy could not repair them);
2. `strip_html` — tags and comments removed, entities (`&amp;`) unescaped;
3. `normalize_unicode` — NFC;
4. `normalize_whitespace` — runs of spaces/tabs become one space, line ends are unified, more than one blank
   line becomes one, ends are stripped.
Then records whose text is shorter than `min_chars` or longer than `max_chars`, or whose required field
became empty (`empty_after_cleaning`) or holds only whitespace and zero-width characters (`zero_width_only`:
U+200B-U+200D, U+2060, U+FEFF, invisible yet not whitespace to Python), are dropped and counted by reason.
Labels are never touched.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter

import ftfy
from ftfy.badness import is_bad

from gemcut.config import CleanConfig
from gemcut.data.records import record_text

# Only tag-shaped markup: "<3" or "a < b" in a tweet or code stays.
_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9:-]*(?:\s+[^<>]*?)?/?>", re.S)
_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")
_SPACE_AROUND_NL = re.compile(r" *\n *")
# Encoding repair only; HTML, quotes, width and normalisation are separate, counted steps (or left alone).
_FTFY = ftfy.TextFixerConfig(unescape_html=False, fix_line_breaks=False, uncurl_quotes=False, fix_latin_ligatures=False,
                             fix_character_width=False, normalization=None, explain=False)
TEXT_FIELDS = ("text", "prompt", "completion", "system", "chosen", "rejected")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Zero-width space, non-joiner, joiner, word joiner, BOM: a text of these alone shows as empty.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def _plain_ascii(s: str) -> bool:
    # ASCII without control characters cannot hold mojibake; skipping ftfy there makes cleaning ~10x faster.
    return s.isascii() and not _CONTROL.search(s)


def fix_mojibake(s: str) -> str:
    return s if _plain_ascii(s) else ftfy.fix_text(s, _FTFY)


def strip_html(s: str) -> str:
    if "<" not in s and "&" not in s:
        return s
    return html.unescape(_TAG.sub(" ", s))


def normalize_unicode(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def normalize_whitespace(s: str) -> str:
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = _SPACES.sub(" ", s)
    s = _SPACE_AROUND_NL.sub("\n", s)
    return _BLANKS.sub("\n\n", s).strip()


class Cleaner:
    """Applies the enabled steps to a record; `changed[step]` counts records each step changed,
    `dropped[reason]` records removed (returned as None)."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.steps = [(name, fn) for name, fn, on in (
            ("fix_mojibake", fix_mojibake, cfg.fix_mojibake),
            ("strip_html", strip_html, cfg.strip_html),
            ("normalize_unicode", normalize_unicode, cfg.normalize_unicode),
            ("normalize_whitespace", normalize_whitespace, cfg.normalize_whitespace),
        ) if on]
        self.changed: Counter = Counter()
        self.dropped: Counter = Counter()
        self.mojibake_suspect = 0
        self.examples: dict[str, list[dict]] = {}

    def _apply(self, s: str, hits: set[str]) -> str:
        for name, fn in self.steps:
            out = fn(s)
            if out != s:
                hits.add(name)
                s = out
        return s

    def clean(self, record: dict) -> dict | None:
        """A cleaned copy of the record, or None when it is dropped (counted in `dropped`)."""
        hits: set[str] = set()
        out = dict(record)
        for f in TEXT_FIELDS:
            if isinstance(out.get(f), str):
                out[f] = self._apply(out[f], hits)
        if "messages" in out:
            out["messages"] = [{**m, "content": self._apply(m["content"], hits)} for m in out["messages"]]
        for name in hits:
            self.changed[name] += 1
            ex = self.examples.setdefault(name, [])
            if len(ex) < 3:
                ex.append({"source": record.get("_source"), "before": record_text(record)[:200], "after": record_text(out)[:200]})
        text = record_text(out)
        if self.cfg.fix_mojibake and not _plain_ascii(text) and is_bad(text):
            self.mojibake_suspect += 1
        reason = self._drop_reason(out)
        if reason:
            self.dropped[reason] += 1
            return None
        return out

    def _drop_reason(self, r: dict) -> str | None:
        parts = [r[f] for f in TEXT_FIELDS if f in r and f != "system"] + [m["content"] for m in r.get("messages", [])]
        if any(not p.strip() for p in parts):
            return "empty_after_cleaning"
        if any(not p.translate(_ZERO_WIDTH).strip() for p in parts):
            return "zero_width_only"
        if "chosen" in r and r["chosen"] == r["rejected"]:
            return "chosen_equals_rejected_after_cleaning"
        n = len(record_text(r))
        if n < self.cfg.min_chars:
            return "shorter_than_min_chars"
        if self.cfg.max_chars is not None and n > self.cfg.max_chars:
            return "longer_than_max_chars"
        return None

    def summary(self) -> dict:
        return {
            "steps_enabled": [n for n, _ in self.steps],
            "changed": {n: self.changed.get(n, 0) for n, _ in self.steps},
            "mojibake_repaired": self.changed.get("fix_mojibake", 0),
            "mojibake_suspect_after": self.mojibake_suspect,
            "dropped": dict(self.dropped),
            "examples": self.examples,
        }
