"""`gemcut runs`: one row per run folder, from the files runs leave.

    python -m pytest -q tests/test_runs_list.py
"""

from __future__ import annotations

import json
import shutil

import torch
from eval_runs import train_run
from typer.testing import CliRunner

from gemcut.cli import app, register_commands
from gemcut.eval.evaluate import evaluate
from gemcut.train.runs_list import list_runs

torch.set_num_threads(1)


def test_runs_lists_finished_unfinished_and_empty_folders(tmp_path):
    finished = train_run(tmp_path, "finished", steps=2)
    evaluate(finished, base=False, max_examples=4, report=False)
    unfinished = tmp_path / "runs" / "unfinished"
    shutil.copytree(finished, unfinished)
    (unfinished / "manifest.json").unlink()
    (unfinished / "eval.json").unlink()
    shutil.rmtree(unfinished / "final")
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((finished / "config.yaml").read_text())
    (tmp_path / "runs" / "not-a-run").mkdir()

    rows = {r.name: r for r in list_runs(tmp_path / "runs")}
    assert set(rows) == {"finished", "unfinished", "empty"}
    done = rows["finished"]
    headline = json.loads((finished / "eval.json").read_text())["headline"]
    assert (done.task, done.status, done.steps, done.max_steps, done.headline) == ("causal_lm", "completed", 2, 2, headline)
    assert done.base.endswith("base-llama") and done.bytes > 0
    assert (rows["unfinished"].status, rows["unfinished"].steps, rows["unfinished"].headline) == ("unfinished", 2, None)
    assert (rows["empty"].status, rows["empty"].steps) == ("not started", None)

    register_commands()
    out = CliRunner().invoke(app, ["runs", str(tmp_path / "runs")])
    assert out.exit_code == 0
    lines = out.output.splitlines()  # not a terminal: whole values, tab-separated
    assert lines[0] == "name\ttask\tbase\tstatus\tsteps\theadline\tsize"
    finished_line = next(line.split("\t") for line in lines if line.startswith("finished\t"))
    assert finished_line[:6] == ["finished", "causal_lm", done.base, "completed", "2/2", headline]
    as_json = json.loads(CliRunner().invoke(app, ["runs", str(tmp_path / "runs"), "--json"]).output)
    assert {r["name"]: r["status"] for r in as_json} == {"finished": "completed", "unfinished": "unfinished", "empty": "not started"}
