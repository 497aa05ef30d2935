"""Data sets derived from packaged data, built once into gemcut's home: `data.train: [chatterbot-pairs]`.

    python -c "from gemcut.data.assets import packaged_data; print(packaged_data('chatterbot-pairs'))"

No preference data set ships in a package, so `chatterbot-pairs` is made from the chatterbot corpus (21
English topic files of question/answer dialogs), read through the pipeline's own readers and normaliser:

- each distinct opening question (its text case-folded, spaces collapsed) gives one pair; its **chosen**
  answer is the reply that follows it in the corpus (the first one, where the corpus repeats a question
  with several replies); later turns of a multi-turn conversation are not used (they lean on the turns
  before them, so they are no question on their own);
- its **rejected** answer is the chosen answer of another question from **another topic file**, drawn
  uniformly among those by `random.Random(SEED)` walking the questions in corpus order (files sorted by
  name). A reply whose text equals one of the question's own replies is never drawn. Every rejected text
  is thus some question's chosen one: the pairs teach which reply fits which question, not which replies
  are bad in themselves.

Preferring the chosen reply teaches a model to answer on topic; the held-out pairwise accuracy (DPO's
log-likelihood comparison, or a reward model's scores) measures it. Records are `preference` records with
provenance in `_` fields (kept out of training): `_topic`, `_rejected_topic`, `_chosen_from`,
`_rejected_from` (`chatterbot/<file>:<line>`).

The file is written to `$GEMCUT_HOME/data/<alias>/<alias>.jsonl` under a temporary folder name, then
renamed, with `gemcut_source.json` (written last) stamping what made it: the sha256 of every source file
and of this module, and the seed. A stamp that differs (the corpus was upgraded, the builder changed) makes
the next use rebuild it; counts of what was read, skipped and paired are in the stamp too.

`derived_data(alias, source)` is handed the packaged source's path by gemcut/data/assets.py, the one place
aliases resolve, so this module never imports it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gemcut.data.normalize import Normalizer
from gemcut.data.readers import expand, read_source
from gemcut.errors import DataError
from gemcut.home import gemcut_home

SEED = 0
STAMP = "gemcut_source.json"  # written last inside the folder: marks a finished build from these sources


@dataclass(frozen=True)
class DerivedData:
    source: str  # the packaged alias it is built from
    build: Callable[[Path, str], tuple[list[dict], dict]]  # (source path, shown name) -> (records, counts)
    description: str


def _key(question: str) -> str:
    return " ".join(question.split()).casefold()


def chatterbot_pairs(source: Path, shown: str = "chatterbot", seed: int = SEED) -> tuple[list[dict], dict]:
    """Preference records from the chatterbot folder `source` (see the module docstring) and the counts."""
    normalizer = Normalizer("messages")
    counts: Counter = Counter()
    opening: list[dict] = []  # every conversation's opening exchange, in corpus order
    for row in read_source(source, "chatterbot", display=shown):
        counts["conversations_read"] += 1
        try:
            records, _ = normalizer.normalize(row)
        except DataError as e:  # a malformed conversation: counted by reason, like data.on_error=skip does
            counts[f"skipped_{e.reason}"] += 1
            continue
        for r in records:
            msgs = r["messages"]
            if len(msgs) < 2 or msgs[0]["role"] != "user" or msgs[1]["role"] != "assistant":
                counts["skipped_no_opening_exchange"] += 1
                continue
            if len(msgs) > 2:
                counts["later_turns_unused"] += (len(msgs) - 2) // 2
            topic = Path(row.path).stem
            opening.append({"topic": topic, "question": msgs[0]["content"], "answer": msgs[1]["content"],
                            "from": row.source, "key": _key(msgs[0]["content"])})
    replies: dict[str, set[str]] = {}  # every reply the corpus gives each question
    pairs: list[dict] = []  # the first opening exchange of each distinct question
    for ex in opening:
        if ex["key"] in replies:
            counts["repeated_question_replies_unused"] += 1
        else:
            pairs.append(ex)
        replies.setdefault(ex["key"], set()).add(ex["answer"].strip())
    rng = random.Random(seed)
    out: list[dict] = []
    for ex in pairs:
        # Another question's own reply, from another topic: every rejected text is some question's chosen one,
        # so the pairs teach which reply fits which question, not which replies are bad in themselves.
        pool = [c for c in pairs if c["topic"] != ex["topic"] and c["answer"].strip() not in replies[ex["key"]]]
        if not pool:
            counts["skipped_no_other_topic"] += 1
            continue
        rejected = rng.choice(pool)
        out.append({"prompt": ex["question"], "chosen": ex["answer"], "rejected": rejected["answer"],
                    "_topic": ex["topic"], "_rejected_topic": rejected["topic"],
                    "_chosen_from": ex["from"], "_rejected_from": rejected["from"]})
    counts["pairs"] = len(out)
    counts["topics"] = len({ex["topic"] for ex in pairs})
    return out, dict(sorted(counts.items()))


DERIVED: dict[str, DerivedData] = {
    "chatterbot-pairs": DerivedData(
        "chatterbot", chatterbot_pairs,
        "preference pairs from chatterbot: chosen = the question's own reply, rejected = a reply from another "
        "topic file (seeded); built once into the gemcut home",
    ),
}


def derived_dir(alias: str) -> Path:
    return gemcut_home() / "data" / alias


def _source_sha256(source: Path) -> dict[str, str]:
    files = expand(source) if source.is_dir() else [source]
    return {str(f.relative_to(source)) if source.is_dir() else f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def derived_data(alias: str, source: Path) -> Path:
    """The JSONL file of derived data set `alias`, built from `source` (the path of the packaged data set
    `DERIVED[alias].source`), or rebuilt when its stamp differs, on first use."""
    spec = DERIVED[alias]
    out = derived_dir(alias)
    stamp = {"alias": alias, "seed": SEED, "source": spec.source, "source_sha256": _source_sha256(source),
             "builder_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    found = _read_stamp(out)
    file = out / f"{alias}.jsonl"
    if found is not None and {k: found.get(k) for k in stamp} == stamp and file.is_file():
        return file
    records, counts = spec.build(source, spec.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with (tmp / file.name).open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / STAMP).write_text(json.dumps({**stamp, "counts": counts}, indent=2), encoding="utf-8")
        if out.exists():  # stale: move it aside first, so the rename below replaces it whole
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(out, old)
            except FileNotFoundError:  # another process moved it already
                old = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:  # a concurrent build renamed its folder first: it made the same file
            if _read_stamp(out) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return file
