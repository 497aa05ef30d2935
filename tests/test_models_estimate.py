"""`gemcut estimate`: memory parts add up, the probe measures activations and time, a run that won't fit is refused."""

import json
import math

import pytest
from tiny import save_tiny_llama

from gemcut.config import RunConfig
from gemcut.errors import TrainingError
from gemcut.models.estimate import ADAM_BYTES, ensure_fits, estimate


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("m") / "tiny-llama")


def _cfg(name, **over):
    raw = {"model": {"name": str(name)}, "adapter": {"method": "lora", "r": 4},
           "train": {"batch_size": 2, "max_steps": 10, "precision": "fp32"}, "data": {"max_length": 32}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return RunConfig.model_validate(raw)


def test_estimate_parts_and_probe(llama_dir):
    est = estimate(_cfg(llama_dir))
    assert est.trainable_params < est.total_params
    assert est.weights_bytes == est.total_params * 4  # float32, tied embedding counted once
    assert est.gradients_bytes == est.trainable_params * 4
    assert est.optimizer_bytes == est.trainable_params * ADAM_BYTES
    assert est.activations_source == "measured" and est.activations_bytes > 0
    assert est.batch_shape == (2, 32) and est.steps == 10
    assert est.seconds_per_step > 0 and est.total_seconds == pytest.approx(10 * est.seconds_per_step)
    assert est.fits and "fits" in str(est) and est.summary.startswith("LoRA r=4")
    # Longer sequences save more activations; the measurement sees it.
    longer = estimate(_cfg(llama_dir, data={"max_length": 96}))
    assert longer.activations_bytes > 2 * est.activations_bytes
    # Without the probe: an approximation, no time.
    quick = estimate(_cfg(llama_dir), probe=False)
    assert quick.activations_source == "approximate" and quick.activations_bytes > 0 and quick.seconds_per_step is None


def test_freeze_and_full_differ_in_trainable_memory(llama_dir):
    full = estimate(_cfg(llama_dir, adapter={"method": "full"}), probe=False)
    frozen = estimate(_cfg(llama_dir, adapter={"method": "freeze", "train_last_n_layers": 1}), probe=False)
    assert full.trainable_params == full.total_params
    assert frozen.optimizer_bytes < full.optimizer_bytes and frozen.activations_bytes < full.activations_bytes


def test_steps_from_the_data(llama_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "completion": f"answer {i}."}) + "\n" for i in range(40)))
    cfg = _cfg(llama_dir, data={"train": [str(data)], "max_length": 64}, train={"max_steps": None, "epochs": 2})
    est = estimate(cfg)
    from gemcut.data.prepare import prepare

    n_train = len(prepare(cfg.data).splits["train"])
    assert 20 < n_train < 40 and est.steps == math.ceil(2 * n_train / 2)


def test_a_run_that_does_not_fit_is_refused(llama_dir):
    est = estimate(_cfg(llama_dir), probe=False)
    est.available_bytes, est.fits = 1000, False
    with pytest.raises(TrainingError, match="train.force=true"):
        ensure_fits(est, force=False)
    ensure_fits(est, force=True)


def test_cli_models_and_estimate(llama_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gemcut.cli import _register, app

    monkeypatch.setenv("GEMCUT_HOME", str(tmp_path / "home"))
    _register()
    out = CliRunner().invoke(app, ["models", "--json"])
    assert out.exit_code == 0, out.output
    assert {"smollm2-135m-instruct", "minilm-l6"} <= {r["name"] for r in json.loads(out.output)}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: {llama_dir}}}\ntrain: {{max_steps: 3, batch_size: 2}}\ndata: {{max_length: 16}}\n")
    out = CliRunner().invoke(app, ["estimate", str(cfg), "adapter.r=2", "--no-probe"])
    assert out.exit_code == 0, out.output
    assert "LoRA r=2" in out.output and "optimizer" in out.output and "fits" in out.output
