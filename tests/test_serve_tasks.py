"""What a served model answers comes from its task in the task table (gemcut_run.json), never its class name.

    python -m pytest -q tests/test_serve_tasks.py
"""

from __future__ import annotations

import shutil

import pytest
import torch
from serve_runs import classifier, plain_model
from tiny import save_tiny_bert, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import gemcut.models.load
from gemcut.config import RunConfig
from gemcut.data.templates import ChatTemplate
from gemcut.models.load import save_final
from gemcut.run_folder import run_meta
from gemcut.serve.registry import ModelRegistry
from gemcut.serve.settings import ServeSettings
from gemcut.serve.worker import ClassifyJob, Worker
from gemcut.tasks import task_named


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("tasks")


def _full_run(run_dir, model, template, task: str, base: str):
    config = RunConfig.model_validate({"model": {"name": base}, "adapter": {"method": "full"}})
    save_final(model, tiny_tokenizer(), template, run_dir / "final", meta=run_meta(config, task))
    return run_dir


def test_a_chat_run_is_served_for_chat_whatever_its_class_is_called(tmp, monkeypatch):
    """The run says causal_lm; its model class's name ends in ForSequenceClassification (a custom class could
    be called anything). Sniffing the name served it as a classifier; the run's task serves it for chat."""
    base = plain_model(tmp / "base")
    run = _full_run(tmp / "chat-run", AutoModelForCausalLM.from_pretrained(base), ChatTemplate.from_tokenizer(tiny_tokenizer()),
                    "causal_lm", str(base))
    real_load_run = gemcut.models.load.load_run

    def load_oddly_named(*args, **kwargs):
        loaded = real_load_run(*args, **kwargs)
        loaded.model.__class__ = type("ChatterForSequenceClassification", (type(loaded.model),), {})
        return loaded

    monkeypatch.setattr(gemcut.models.load, "load_run", load_oddly_named)
    served = ModelRegistry(ServeSettings(device="cpu")).add(str(run))
    assert type(served.model).__name__ == "ChatterForSequenceClassification"
    assert served.task is task_named("causal_lm")
    assert served.generates and not served.classifies and served.kind == "causal_lm"
    assert served.template is not None and served.pooling is None


@pytest.fixture(scope="module")
def reward_run(tmp):
    """A full reward-model run: a BERT with one output named `reward`."""
    base = save_tiny_bert(tmp / "bert-1", num_labels=1)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
    return _full_run(tmp / "reward-run", model, None, "reward", str(base))


def test_a_reward_run_is_served_as_a_one_score_classifier(reward_run):
    """task reward (served_as score): /v1/classify answers, with its single `reward` label, as before the table."""
    registry = ModelRegistry(ServeSettings(device="cpu"))
    served = registry.add(str(reward_run))
    assert served.task is task_named("reward") and served.task.served_as == "score"
    assert served.classifies and not served.generates and served.kind == "classify"
    assert served.template is None and served.pooling == "cls"
    worker = Worker(ServeSettings(), lock=registry.lock)
    worker.start()
    try:
        probs = worker.submit(ClassifyJob(served, texts=["good answer", "bad"])).result(timeout=60)
    finally:
        worker.stop()
    assert probs == [[1.0], [1.0]]


def test_an_exported_folder_is_served_for_the_task_its_run_record_names(tmp, reward_run):
    """An export carries its run's gemcut_run.json: that names the task (reward here), not config.json."""
    export = tmp / "reward-export"
    shutil.copytree(reward_run / "final", export)  # a full run's final/ is what a merged export holds
    served = ModelRegistry(ServeSettings(device="cpu")).add(str(export))
    assert served.task is task_named("reward") and served.kind == "classify" and served.labels == ["reward"]


def test_a_foreign_folder_without_a_run_record_is_judged_by_its_config(tmp):
    """A folder gemcut did not write has no task of its own: its config.json architectures decide."""
    registry = ModelRegistry(ServeSettings(device="cpu"))
    chat = registry.add(str(plain_model(tmp / "foreign-chat")))
    clf = registry.add(str(classifier(tmp / "foreign-clf")))
    assert chat.task is task_named("causal_lm") and chat.generates
    assert clf.task is task_named("classify") and clf.classifies and clf.labels == ["negative", "neutral", "positive"]


@pytest.mark.parametrize("fast", [True, False])
def test_an_exported_classifier_runs_the_speed_tricks_its_run_had(tmp, fast):
    """`train.fast` in the export's gemcut_run.json decides the exact speed tricks it is served with, as
    `load_run` does for a run folder; the logits are the same either way."""
    from gemcut.models.fast import applied
    from gemcut.run_folder import write_run_meta

    folder = classifier(tmp / f"export-fast-{fast}")
    config = RunConfig.model_validate({"model": {"name": str(folder)}, "data": {"kind": "label"}, "train": {"fast": fast}})
    write_run_meta(folder, run_meta(config, "classify", ["negative", "neutral", "positive"]))
    served = ModelRegistry(ServeSettings(device="cpu")).add(str(folder))
    assert applied(served.model) == (["padding_free", "first_token"] if fast else [])
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])}
    with torch.no_grad():
        torch.testing.assert_close(served.model(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-5)
