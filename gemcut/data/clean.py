"""Cleaning: optional, counted steps applied to every text field of a record, right for its kind of text.

    python -c "from gemcut.data.clean import Cleaner; from gemcut.config import CleanConfig; \
c = Cleaner(CleanConfig()); print(c.clean({'text': 'caf\u00c3\u00a9 &amp; <b>bar</b>'}), c.summary()['changes'])"

Steps, in order (each switched by `data.clean.*`; each change counted by reason, in records):
1. `fix_mojibake` — ftfy repairs text decoded with the wrong encoding (and C1 controls, surrogates);
   records that still look garbled afterwards are counted as `mojibake_suspect` (ftfy could not repair them);
2. `strip_html` — only markup goes: a tag counts when its name is an HTML element (`HTML_ELEMENTS`, from the
   HTML standard) with well-formed attributes, and, for an element that needs an end tag, when the text
   holds both its start and end tag (`<b>x</b>`; `List<T>`, `<MyComponent />`, `runs/<name>`, `Box<A>` stay).
   Comments go too. Entities (`&amp;`, `&#39;`, with their `;`) are decoded only where HTML is stripped.
   Code is never touched: fenced blocks, inline `code` spans, and a whole text that looks like code
   (`looks_like_code`: two or more lines indented by a tab or 4 spaces, or ending in `{`, `}` or `;`, or in
   `:` before a more indented line);
3. `normalize_unicode` — NFC;
4. `normalize_whitespace` — per kind of text. Training targets (`text`, `prompt_completion`, `messages`,
   `preference`) keep their indentation and inner spaces: line ends are unified, trailing whitespace is
   trimmed on every line and at the end, leading blank lines go, and 3+ blank lines become 2. `label` text
   (classification input, not a training target) is fully normalised: runs of spaces and tabs become one
   space, 2+ blank lines become one, the ends are stripped.
Then records whose text is shorter than `min_chars` or longer than `max_chars`, or whose required field
became empty (`empty_after_cleaning`) or holds only whitespace and zero-width characters (`zero_width_only`:
U+200B-U+200D, U+2060, U+FEFF, invisible yet not whitespace to Python), are dropped and counted by reason.
Labels are never touched. Each reason keeps three examples, before and after, cut to the changed region
(`changed_region`): from the first to the last changed character, with 40 characters either side.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Callable

import ftfy
from ftfy.badness import is_bad

from gemcut.config import CleanConfig
from gemcut.data.records import record_kind, record_text

# Element names of the HTML standard (https://html.spec.whatwg.org/multipage/indices.html#elements-3).
HTML_ELEMENTS = frozenset("""
a abbr address area article aside audio b base bdi bdo blockquote body br button canvas caption cite code col colgroup
data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 head
header hgroup hr html i iframe img input ins kbd label legend li link main map mark menu meta meter nav noscript object
ol optgroup option output p picture pre progress q rp rt ruby s samp script search section select slot small source
span strong style sub summary sup table tbody td template textarea tfoot th thead time title tr track u ul var video wbr
""".split())
# Void elements have no end tag; alone they count as markup only as br/hr/wbr or with attributes
# (`<img src=x>`), so that a placeholder such as `cmd <input> <output>` stays.
_VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())
_BARE_VOID_OK = frozenset({"br", "hr", "wbr"})
# Elements that break a line when rendered: their tags become a newline, other tags vanish.
_BLOCK = frozenset("""address article aside blockquote br dd details dialog div dl dt fieldset figcaption figure footer
form h1 h2 h3 h4 h5 h6 header hgroup hr li main nav ol p pre section summary table tbody td tfoot th thead tr ul""".split())
_ATTR = r"""[A-Za-z_:@][-\w:.@]*(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?"""
_TAG = re.compile(rf"<!--.*?-->|<(/?)([A-Za-z][A-Za-z0-9]*)((?:\s+{_ATTR})*)\s*(/?)>", re.S)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# Protected from HTML stripping: fenced code blocks (to their closing fence, or the end) and inline code spans.
_CODE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)|`[^`\n]+`", re.S | re.M)
_CODE_LINE = re.compile(r"^(?:\t| {4}).*\S|[{};][ \t]*$")

_TRAILING = re.compile(r"[^\S\n]+$", re.M)
_END = re.compile(r"\s+\Z")
_LEADING_BLANK = re.compile(r"\A(?:[^\S\n]*\n)+")
_BLANK_RUNS = re.compile(r"\n{4,}")  # after trailing whitespace is gone: 3+ blank lines
_SPACES = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NL = re.compile(r" *\n *")
_BLANKS = re.compile(r"\n{3,}")
# Encoding repair only; HTML, quotes, width and normalisation are separate, counted steps (or left alone).
_FTFY = ftfy.TextFixerConfig(unescape_html=False, fix_line_breaks=False, uncurl_quotes=False, fix_latin_ligatures=False,
                             fix_character_width=False, normalization=None, explain=False)
TEXT_FIELDS = ("text", "prompt", "completion", "system", "chosen", "rejected")
CONTEXT = 40  # characters shown either side of a changed region
REGION_LIMIT = 2000  # a changed region longer than this is cut, saying how much is left out


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Zero-width space, non-joiner, joiner, word joiner, BOM: a text of these alone shows as empty.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def _plain_ascii(s: str) -> bool:
    # ASCII without control characters cannot hold mojibake; skipping ftfy there makes cleaning ~10x faster.
    return s.isascii() and not _CONTROL.search(s)


def fix_mojibake(s: str) -> str:
    return s if _plain_ascii(s) else ftfy.fix_text(s, _FTFY)


def looks_like_code(s: str) -> bool:
    """Two or more code-shaped lines: indented by a tab or 4 spaces, ending in `{`, `}` or `;`, or ending in
    `:` before a more indented line (a Python block). Prose with one such line is not code."""
    lines = s.split("\n")
    n = 0
    for i, line in enumerate(lines):
        if _CODE_LINE.search(line):
            n += 1
        elif line.rstrip().endswith(":") and i + 1 < len(lines):
            nxt = lines[i + 1]
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) > len(line) - len(line.lstrip()):
                n += 1
        if n >= 2:
            return True
    return False


def _outside_code(s: str, fn: Callable[[str], str]) -> str:
    """`fn` applied to the parts of `s` that are not code (see `looks_like_code`, `_CODE`)."""
    if not _CODE.search(s):
        return s if looks_like_code(s) else fn(s)
    out, pos = [], 0
    for m in _CODE.finditer(s):
        out += [fn(s[pos:m.start()]), m.group(0)]
        pos = m.end()
    return "".join(out + [fn(s[pos:])])


def _markup(s: str) -> list[re.Match]:
    """The tags of `s` that are HTML markup (see the module docstring)."""
    found = []
    opened, closed = set(), set()
    for m in _TAG.finditer(s):
        if m.group(0).startswith("<!--"):
            found.append(m)
            continue
        name = m.group(2).lower()
        if name not in HTML_ELEMENTS:
            continue
        (closed if m.group(1) else opened).add(name)
        found.append(m)
    keep = []
    for m in found:
        if m.group(0).startswith("<!--"):
            keep.append(m)
            continue
        name, attrs = m.group(2).lower(), m.group(3).strip()
        if name in _VOID:
            ok = name in _BARE_VOID_OK or bool(attrs)
        else:
            ok = name in opened and name in closed
        if ok:
            keep.append(m)
    return keep


def _remove_tags(s: str) -> str:
    if "<" not in s:
        return s
    tags = _markup(s)
    if not tags:
        return s
    out, pos = [], 0
    for m in tags:
        name = (m.group(2) or "").lower()
        out += [s[pos:m.start()], "\n" if name in _BLOCK else ""]
        pos = m.end()
    return "".join(out + [s[pos:]])


def _decode_entities(s: str) -> str:
    if "&" not in s:
        return s
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), s)


def strip_html(s: str) -> str:
    """Tags that are markup removed (block elements leave a newline), then entities decoded, outside code."""
    return decode_entities(remove_tags(s))


def remove_tags(s: str) -> str:
    return _outside_code(s, _remove_tags) if "<" in s else s


def decode_entities(s: str) -> str:
    return _outside_code(s, _decode_entities) if "&" in s else s


def normalize_unicode(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def unify_line_endings(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n") if "\r" in s else s


def trim_trailing_whitespace(s: str) -> str:
    return _END.sub("", _TRAILING.sub("", s))


def drop_leading_blank_lines(s: str) -> str:
    return _LEADING_BLANK.sub("", s)


def collapse_blank_runs(s: str) -> str:
    """3 or more blank lines become 2 (code and markdown use two)."""
    return _BLANK_RUNS.sub("\n\n\n", s)


def collapse_spaces(s: str) -> str:
    """`label` text: runs of spaces and tabs become one space, also around line ends and at the ends."""
    return _SPACE_AROUND_NL.sub("\n", _SPACES.sub(" ", s)).strip(" ")


def collapse_blank_lines(s: str) -> str:
    """`label` text: 2 or more blank lines become one."""
    return _BLANKS.sub("\n\n", s).strip("\n")


def normalize_whitespace(s: str, kind: str = "text") -> str:
    """The whole whitespace step for one kind of text (see the module docstring)."""
    for _, fn in _WHITESPACE[kind == "label"]:
        s = fn(s)
    return s


# Each step is a list of (reason, function): the report counts records by reason.
_HTML = [("html_tags_removed", remove_tags), ("html_entities_decoded", decode_entities)]
_WHITESPACE = {
    False: [("line_endings_unified", unify_line_endings), ("trailing_whitespace_trimmed", trim_trailing_whitespace),
            ("leading_blank_lines_removed", drop_leading_blank_lines), ("blank_line_runs_collapsed", collapse_blank_runs)],
    True: [("line_endings_unified", unify_line_endings), ("spaces_collapsed", collapse_spaces),
           ("blank_line_runs_collapsed", collapse_blank_lines)],
}


def changed_region(before: str, after: str, context: int = CONTEXT, limit: int = REGION_LIMIT) -> tuple[str, str]:
    """`before` and `after` cut to the region from their first to their last differing character, with
    `context` characters either side; "…" marks a cut. A region over `limit` characters is shortened, saying so."""
    n = min(len(before), len(after))
    p = 0
    while p < n and before[p] == after[p]:
        p += 1
    q = 0
    while q < n - p and before[-1 - q] == after[-1 - q]:
        q += 1
    start = max(0, p - context)

    def cut(s: str) -> str:
        end = min(len(s), len(s) - q + context)
        piece = s[start:end]
        if len(piece) > limit:
            piece = piece[:limit] + f"… [{len(piece) - limit} more characters]"
        return ("…" if start > 0 else "") + piece + ("…" if end < len(s) else "")

    return cut(before), cut(after)


class Cleaner:
    """Applies the enabled steps to a record. `changed[step]` counts the records each step changed and
    `changes[reason]` the records changed for each reason; `dropped[reason]` counts records removed
    (returned as None); `examples[reason]` keeps three changed regions."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.steps = [name for name, on in (("fix_mojibake", cfg.fix_mojibake), ("strip_html", cfg.strip_html),
                                            ("normalize_unicode", cfg.normalize_unicode),
                                            ("normalize_whitespace", cfg.normalize_whitespace)) if on]
        self.changed: Counter = Counter()
        self.changes: Counter = Counter()
        self.dropped: Counter = Counter()
        self.mojibake_suspect = 0
        self.examples: dict[str, list[dict]] = {}

    def _passes(self, step: str, label: bool) -> list[tuple[str, Callable[[str], str]]]:
        if step == "fix_mojibake":
            return [("mojibake_repaired", fix_mojibake)]
        if step == "strip_html":
            return _HTML
        if step == "normalize_unicode":
            return [("unicode_normalized_nfc", normalize_unicode)]
        return _WHITESPACE[label]

    def _apply(self, s: str, label: bool, field: str, record: dict, hits: set[tuple[str, str]]) -> str:
        for step in self.steps:
            for reason, fn in self._passes(step, label):
                out = fn(s)
                if out != s:
                    if (step, reason) not in hits:
                        hits.add((step, reason))
                        ex = self.examples.setdefault(reason, [])
                        if len(ex) < 3:
                            before, after = changed_region(s, out)
                            ex.append({"source": record.get("_source"), "field": field, "before": before, "after": after})
                    s = out
        return s

    def clean(self, record: dict) -> dict | None:
        """A cleaned copy of the record, or None when it is dropped (counted in `dropped`)."""
        hits: set[tuple[str, str]] = set()
        label = record_kind(record) == "label"
        out = dict(record)
        for f in TEXT_FIELDS:
            if isinstance(out.get(f), str):
                out[f] = self._apply(out[f], label, f, record, hits)
        if "messages" in out:
            out["messages"] = [{**m, "content": self._apply(m["content"], label, f"messages[{i}].content", record, hits)}
                               for i, m in enumerate(out["messages"])]
        for step in {step for step, _ in hits}:
            self.changed[step] += 1
        for _, reason in hits:
            self.changes[reason] += 1
        text = record_text(out)
        if self.cfg.fix_mojibake and not _plain_ascii(text) and is_bad(text):
            self.mojibake_suspect += 1
        reason = self._drop_reason(out)
        if reason:
            self.dropped[reason] += 1
            return None
        return out

    def _drop_reason(self, r: dict) -> str | None:
        # An assistant turn that only calls tools has no content by design (its calls are the target).
        parts = [r[f] for f in TEXT_FIELDS if f in r and f != "system"] + [
            m["content"] for m in r.get("messages", []) if m["content"] or not m.get("tool_calls")]
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
            "steps_enabled": list(self.steps),
            "changed": {n: self.changed.get(n, 0) for n in self.steps},
            "changes": dict(self.changes),
            "mojibake_repaired": self.changed.get("fix_mojibake", 0),
            "mojibake_suspect_after": self.mojibake_suspect,
            "dropped": dict(self.dropped),
            "examples": self.examples,
        }
