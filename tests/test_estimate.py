"""`gemcut estimate` (gemcut/train/estimate.py): memory parts add up, the probe measures activations and time,
and the time model follows what `fit` will do (its batches, evaluations, steps) at about its speed."""

import json
import math
import statistics

import pytest
import torch
from tiny import save_tiny_llama, tiny_tokenizer
from train_helpers import causal_examples, collate_causal, config, fit_examples, llama

from gemcut.config import RunConfig
from gemcut.train import estimate as estimate_module
from gemcut.train.estimate import ADAM_BYTES, estimate, evaluations, plan_steps, total_steps


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("m") / "tiny-llama")


def _cfg(name, **over):
    raw = {"model": {"name": str(name)}, "adapter": {"method": "lora", "r": 4},
           "train": {"batch_size": 2, "max_steps": 10, "precision": "fp32"}, "data": {"max_length": 32}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return RunConfig.model_validate(raw)


def _qa(path, n, words=13):
    """Prompt/completion records of varied length (a prompt of 0..words-1 repeated phrases)."""
    path.write_text("".join(json.dumps({"prompt": f"question {i}? " + "the quick brown fox " * (i % words),
                                        "completion": f"answer {i} " + "is paris " * (i % 5)}) + "\n" for i in range(n)))
    return path


def test_estimate_parts_and_probe(llama_dir, monkeypatch):
    monkeypatch.setattr(estimate_module, "PROBE_SECONDS", 1e9)  # every timed pass runs, however slow the machine
    est = estimate(_cfg(llama_dir))
    assert est.trainable_params < est.total_params
    assert est.weights_bytes == est.total_params * 4  # float32, tied embedding counted once
    assert est.gradients_bytes == est.trainable_params * 4
    assert est.optimizer_bytes == est.trainable_params * ADAM_BYTES
    assert est.activations_source == "measured" and est.activations_bytes > 0
    assert est.batch_shape == (2, 32) and est.steps == 10
    # No data: nothing to prepare, tokenize or validate; the run's time is its steps.
    assert set(est.time_parts) == {"steps"} and est.total_seconds == pytest.approx(10 * est.seconds_per_step)
    assert est.probe_passes == {"warm-up": 1, "train": 3}
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
    cfg = _cfg(llama_dir, data={"train": [str(_qa(tmp_path / "qa.jsonl", 41))], "max_length": 256},
               train={"max_steps": None, "epochs": 2})
    est = estimate(cfg, probe=False)  # the step count comes from the data, not from the probe
    from gemcut.data.prepare import prepare

    n_train = len(prepare(cfg.data).splits["train"])
    assert 20 < n_train < 41 and est.steps == 2 * math.ceil(n_train / 2) == total_steps(cfg, n_train)


@pytest.mark.parametrize("grouped", [True, False])
def test_the_plan_is_the_batches_fit_takes(tmp_path, grouped):
    """plan_steps lists the examples of every micro-batch `fit` collates, in order, across epochs and with
    accumulation (20 examples, 6 a step: each epoch ends with a short step)."""
    from gemcut.objectives import CausalLM

    examples = causal_examples(20)
    index = {id(ex): i for i, ex in enumerate(examples)}
    seen = []

    def recording(batch):
        seen.append([index[id(ex)] for ex in batch])
        return collate_causal(batch)

    cfg = config(max_steps=8, batch_size=6, micro_batch_size=3, seed=3, group_by_length=grouped)
    fit_examples(llama(), CausalLM(), examples, recording, config=cfg, run_dir=tmp_path)
    plan = plan_steps([len(ex["input_ids"]) for ex in examples], batch_size=6, micro_batch_size=3, steps=8, seed=3, grouped=grouped)
    assert [mb for step in plan for mb in step] == seen
    assert [len(step) for step in plan] == [2, 2, 2, 1, 2, 2, 2, 1]


def test_evaluations_and_steps_count_like_fit():
    assert evaluations(12, 6) == 2 and evaluations(10, 3) == 4 and evaluations(10, None) == 1 and evaluations(3, 5) == 1
    cfg = config(batch_size=8, micro_batch_size=4, epochs=1.5)
    assert total_steps(cfg, 33) == math.ceil(1.5 * 5) and total_steps(config(max_steps=7), None) == 7
    assert total_steps(config(), None) is None


def test_a_sample_stands_for_the_data_and_the_probe_runs_a_fixed_number_of_passes(llama_dir, tmp_path, monkeypatch):
    """The estimate's own time is bounded by design: it tokenizes at most SAMPLE_RECORDS training records
    (scaling the counts to the whole split) and runs the model at most probe_steps + 4 times, whatever the
    data size; timed passes after the first only within PROBE_SECONDS."""
    import gemcut.data.tokenize as tokenize_module

    monkeypatch.setattr(estimate_module, "SAMPLE_RECORDS", 40)
    monkeypatch.setattr(estimate_module, "PROBE_SECONDS", 1e9)
    tokenized = []
    real = tokenize_module.tokenize_records

    def counting(records, *args, **kwargs):
        records = list(records)
        tokenized.append(len(records))
        return real(records, *args, **kwargs)

    monkeypatch.setattr(tokenize_module, "tokenize_records", counting)
    cfg = _cfg(llama_dir, data={"train": [str(_qa(tmp_path / "qa.jsonl", 300))], "max_length": 256,
                                "split": {"validation": 0.1, "test": 0.0}},
               train={"max_steps": None, "epochs": 1, "eval_every": 20, "batch_size": 4})
    est = estimate(cfg, probe_steps=3)
    from gemcut.data.prepare import prepare

    n_train = len(prepare(cfg.data).splits["train"])
    assert n_train > 200 and tokenized[:2] == [40, 10]  # training sample, then a quarter of it for validation
    assert est.steps == math.ceil(n_train / 4)  # every record is one example (none is longer than max_length)
    assert est.probe_passes == {"warm-up": 2, "train": 3, "validation forward": 1, "one-token forward": 1}
    assert set(est.time_parts) == {"prepare", "tokenize", "load", "steps", "validation", "samples"}
    assert est.total_seconds == pytest.approx(sum(est.time_parts.values()))
    assert est.time_parts["steps"] == pytest.approx(est.steps * est.seconds_per_step)
    # With no time budget left after the first timed pass, there is no second one.
    monkeypatch.setattr(estimate_module, "PROBE_SECONDS", 0.0)
    assert estimate(cfg, probe_steps=3).probe_passes["train"] == 1


def test_predicted_step_time_is_near_a_real_runs(tmp_path):
    """The predicted seconds per step of a small model (4 layers, 1.1M parameters, so a step computes more
    than the loop's bookkeeping) is within 2.5x of the step time of the same run trained for real, measured
    right after it on one thread, and the run validates as often as the estimate counted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gemcut.train.run import train

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = RunConfig.model_validate({
        "model": {"name": str(tmp_path / "m")}, "adapter": {"method": "lora", "r": 4},
        "train": {"batch_size": 8, "max_steps": 8, "precision": "fp32", "eval_every": 4, "num_threads": 1, "log_every": 2},
        "data": {"train": [str(_qa(tmp_path / "qa.jsonl", 200))], "max_length": 128, "split": {"validation": 0.1, "test": 0.0}},
        "output": {"dir": str(tmp_path / "runs")}})
    threads = torch.get_num_threads()
    try:
        est = estimate(cfg, probe_steps=3)
        rows = [json.loads(line) for line in (train(cfg) / "metrics.jsonl").read_text().splitlines()]
    finally:
        torch.set_num_threads(threads)
    # Each training row covers the 2 steps since the previous one (evaluation and saving not included).
    measured = statistics.median(r["tokens"] / r["tokens_per_s"] / 2 for r in rows if "tokens_per_s" in r)
    assert 1 / 2.5 < est.seconds_per_step / measured < 2.5, (est.seconds_per_step, measured)
    assert sum("val_loss" in r for r in rows) == evaluations(8, 4) == 2


def test_cli_models_and_estimate(llama_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gemcut.cli import app, register_commands

    monkeypatch.setenv("GEMCUT_HOME", str(tmp_path / "home"))
    register_commands()
    out = CliRunner().invoke(app, ["models", "--json"])
    assert out.exit_code == 0, out.output
    assert {"smollm2-135m-instruct", "minilm-l6"} <= {r["name"] for r in json.loads(out.output)}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: {llama_dir}}}\ntrain: {{max_steps: 3, batch_size: 2}}\ndata: {{max_length: 16}}\n")
    out = CliRunner().invoke(app, ["estimate", str(cfg), "adapter.r=2", "--no-probe"])
    assert out.exit_code == 0, out.output
    assert "LoRA r=2" in out.output and "optimizer" in out.output and "fits" in out.output
    out = CliRunner().invoke(app, ["estimate", str(cfg), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)  # stderr has the model loading's progress bar
    assert data["time_parts"] == {"steps": pytest.approx(3 * data["seconds_per_step"])} and data["estimate_seconds"] > 0
