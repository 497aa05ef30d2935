"""The `gemcut` command's own manners: one-line usage errors with the fix, --version, exit codes.

    python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import pytest

from gemcut.cli import main
from gemcut.version import __version__


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


def _train_tiny_classifier(tmp_path, *flags: str) -> str:
    """`gemcut [flags] train` of a tiny BERT classifier in a fresh process (libraries read their switches at import)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tiny import save_tiny_bert

    model = save_tiny_bert(tmp_path / "bert")
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i}", "label": "ab"[i % 2]}) + "\n" for i in range(40)))
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{train: [{data}], split: {{validation: 0.1, test: 0.1}}}}\nmodel: {{name: {model}}}\n"
                      f"train: {{max_steps: 1, batch_size: 4, num_threads: 1}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    done = subprocess.run([str(Path(sys.executable).parent / "gemcut"), *flags, "train", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_library_noise_is_off_by_default_and_back_with_verbose(tmp_path):
    quiet = _train_tiny_classifier(tmp_path / "quiet")
    assert "new classifier head (2 outputs), initialised from the seed" in quiet  # the load report, in one line
    for noise in ("Loading weights", "LOAD REPORT", "FutureWarning", "DeprecationWarning", "\x1b["):
        assert noise not in quiet, noise
    loud = _train_tiny_classifier(tmp_path / "loud", "--verbose")
    assert "Loading weights" in loud and "LOAD REPORT" in loud
