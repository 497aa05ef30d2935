"""The import rule that import-linter cannot see: no private name (`_x`) is imported from another module.

    python -m pytest -q tests/test_layers.py
    lint-imports     # the layers, the package root and the cycles: [tool.importlinter] in pyproject.toml

import-linter reads which modules import which, not the names imported, so a private helper borrowed across
files (`from gemcut.train.loop import _Interrupt`) is found here, in the source of gemcut/, bench/ and tests/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def private_imports(source: str) -> list[tuple[int, str, str]]:
    """(line, module, name) of each `from gemcut... import _name` in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gemcut":
            found += [(node.lineno, node.module, a.name) for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_the_check_finds_a_private_import():
    source = "from gemcut.train.loop import fit, _Interrupt\nfrom gemcut import __version__\n"
    assert private_imports(source) == [(1, "gemcut.train.loop", "_Interrupt")]


def test_no_private_name_is_imported_across_modules():
    files = [f for folder in ("gemcut", "bench", "tests") for f in sorted((ROOT / folder).rglob("*.py"))]
    found = [f"{f.relative_to(ROOT)}:{line}: from {module} import {name}"
             for f in files for line, module, name in private_imports(f.read_text(encoding="utf-8"))]
    assert not found, "private names imported from another module (make them public, or move the code):\n" + "\n".join(found)
