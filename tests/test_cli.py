"""The `gemcut` command's own manners: one-line usage errors with the fix, --version, exit codes.

    python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import pytest

from gemcut import __version__
from gemcut.cli import main


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.argv", ["gemcut", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize(("args", "line"), [
    (("train",), "error: Missing argument 'config'. (see `gemcut train --help`)"),
    (("train", "x.yaml", "--bogus"), "error: No such option: --bogus (see `gemcut train --help`)"),
    (("data", "chek"), "error: No such command 'chek'. Did you mean 'check'? (see `gemcut data --help`)"),
])
def test_usage_errors_are_one_line_with_the_fix(monkeypatch, capsys, args, line):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert err.strip() == line and "Traceback" not in out + err


def test_version(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"gemcut {__version__}"


def test_a_person_error_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "train", str(tmp_path / "missing.yaml"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "missing.yaml" in err
