"""`train.report_to`: MLflow (a local file store) and W&B (offline) get the config and the per-step metrics.

    python -m pytest -q tests/test_trackers.py

Each test trains a tiny Llama for a few steps through `gemcut.train` (seconds) and reads the trackers'
own records back: the MLflow client, W&B's offline run folder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from eval_runs import completion_file
from tiny import save_tiny_llama

from gemcut.config import RunConfig, load_config
from gemcut.errors import ConfigError, GemcutError
from gemcut.train.logging import TRACKERS_FILE, RunLogger

torch.set_num_threads(1)

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


def tiny_run(root: Path, name: str, report_to, steps: int = 4, resume: bool = False, **train) -> Path:
    from gemcut.train.run import train as run_train

    base = root / "base"
    if not base.exists():
        save_tiny_llama(base)
    data = completion_file(root / "completions.jsonl")
    cfg = RunConfig.model_validate({
        "data": {"train": [str(data)], "split": {"validation": 0.2, "test": 0.2}},
        "model": {"name": str(base)}, "adapter": {"method": "lora", "r": 4},
        "train": {"max_steps": steps, "eval_every": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32",
                  "sample_prompts": 0, "warmup_steps": 0, "report_to": report_to, **train},
        "eval": {"forgetting_data": None}, "output": {"dir": str(root / "runs"), "name": name},
    })
    return run_train(cfg, resume=resume)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_report_to_validates():
    assert load_config(None).train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=none"]).train.report_to == []
    assert load_config(None, ["train.report_to=[]"]).train.report_to == []
    assert load_config(None, ["train.report_to=mlflow"]).train.report_to == ["mlflow"]
    with pytest.raises(ConfigError, match=r"train.report_to.0.*'tensorboard', 'mlflow' or 'wandb'.*'comet'"):
        load_config(None, ["train.report_to=[comet]"])
    with pytest.raises(ConfigError, match='"wandb" is listed twice'):
        load_config(None, ["train.report_to=[wandb, wandb]"])


def test_none_writes_no_tensorboard_and_a_resume_may_change_it(tmp_path):
    run = tiny_run(tmp_path, "quiet", "none", steps=2)
    assert not (run / "tb").exists() and len(metrics(run)) >= 2
    assert not (run / TRACKERS_FILE).exists()
    tiny_run(tmp_path, "quiet", ["tensorboard"], steps=2, resume="step-2")  # trackers change no computation
    assert (run / "tb").is_dir()


def test_a_missing_package_is_named(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(GemcutError, match=r"pip install wandb .*gemcut\[tracking\]"):
        RunLogger(tmp_path / "run", total_steps=1, config={"train": {"report_to": ["wandb"]}}, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@needs_mlflow
def test_mlflow_gets_the_config_and_every_logged_loss_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "gemcut-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ asks for this to use a plain folder
    run = tiny_run(tmp_path, "tracked", ["tensorboard", "mlflow"], steps=4)
    run_id = json.loads((run / TRACKERS_FILE).read_text())["mlflow"]["run_id"]
    client = MlflowClient(store.as_uri())
    got = client.get_run(run_id)
    assert got.info.run_name == "tracked" and got.info.status == "FINISHED"
    assert got.data.params["train.lr"] == "0.01" and got.data.params["model.name"] == str(tmp_path / "base")
    train_lines = [m for m in metrics(run) if "loss" in m]
    history = client.get_metric_history(run_id, "train/loss")
    assert [h.step for h in history] == [m["step"] for m in train_lines] == [1, 2, 3, 4]
    assert [h.value for h in history] == pytest.approx([m["loss"] for m in train_lines], rel=1e-6)
    val = [m for m in metrics(run) if "val_loss" in m]
    assert [h.value for h in client.get_metric_history(run_id, "val_loss")] == pytest.approx([m["val_loss"] for m in val])
    assert (run / "tb").is_dir()  # TensorBoard too

    # Resumed from step 2 (as after an interruption there), the run logs steps 3 and 4 into the same MLflow run.
    tiny_run(tmp_path, "tracked", ["tensorboard", "mlflow"], steps=4, resume="step-2")
    assert json.loads((run / TRACKERS_FILE).read_text())["mlflow"]["run_id"] == run_id
    again = client.get_metric_history(run_id, "train/loss")
    assert [h.step for h in again] == [1, 2, 3, 4, 3, 4]  # MLflow keeps points: steps 3 and 4 twice
    assert [h.value for h in again[-2:]] == pytest.approx([m["loss"] for m in metrics(run) if "loss" in m][-2:], rel=1e-6)
    assert len(client.search_runs([got.info.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (`run-<id>.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB-log framing (32 KiB blocks; each chunk: crc32, length, type 1 full / 2 first /
    3 middle / 4 last). wandb 0.31 keeps no Python reader of its own, and an offline run writes no summary file."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@needs_wandb
def test_wandb_offline_run_holds_the_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tiny_run(tmp_path, "offline", ["wandb"], steps=4)
    run_id = json.loads((run / TRACKERS_FILE).read_text())["wandb"]["id"]
    folders = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1, sorted(p.name for p in (tmp_path / "wb" / "wandb").iterdir())
    records = wandb_records(folders[0] / f"run-{run_id}.wandb")
    history = {}  # step -> {key: value}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    train_lines = [m for m in metrics(run) if "loss" in m]
    assert sorted(history) == [m["step"] for m in train_lines] == [1, 2, 3, 4]
    assert [history[m["step"]]["train/loss"] for m in train_lines] == pytest.approx([m["loss"] for m in train_lines], rel=1e-6)
    val = [m for m in metrics(run) if "val_loss" in m]
    assert [history[m["step"]]["val_loss"] for m in val] == pytest.approx([m["val_loss"] for m in val])
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["train"]["report_to"] == ["wandb"] and config["train"]["max_steps"] == 4
    assert config["output"]["name"] == "offline"
    assert not (run / "tb").exists()  # report_to without tensorboard
