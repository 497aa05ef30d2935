"""What a wheel of gemcut carries besides Python: [tool.setuptools.package-data] in pyproject.toml.

    python -m pytest -q tests/test_packaging.py

An editable install reads files from the source tree, so a file missing from package-data shows only in a
real install (the quickstart's presets, the ranking page). Each listed pattern must match a file, and each
file under gemcut/ that is not Python must be matched by a pattern.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gemcut"


def package_data() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return config["tool"]["setuptools"]["package-data"]["gemcut"]


def test_every_package_data_pattern_names_files_that_exist():
    empty = [pattern for pattern in package_data() if not any(p.is_file() for p in PACKAGE.glob(pattern))]
    assert not empty, f"package-data patterns that match no file: {empty}"


def test_every_data_file_of_the_package_is_listed():
    listed = {p for pattern in package_data() for p in PACKAGE.glob(pattern)}
    data = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    missing = sorted(str(p.relative_to(PACKAGE)) for p in data if p not in listed)
    assert not missing, f"files under gemcut/ that a wheel would leave out (add them to package-data): {missing}"
