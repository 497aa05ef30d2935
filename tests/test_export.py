"""Export parity: merged and adapter exports give the run's logits when loaded by plain transformers/peft;
int8 loads, is smaller, agrees with the float model, and answers through the server's engine.

    python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import json

import pytest
import torch
from serve_runs import lora_run, plain_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from gemcut.errors import GemcutError
from gemcut.export import export_run, load_int8
from gemcut.models.load import load_run

MSG = [{"role": "user", "content": "what is the capital of france?"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("export")
    base = plain_model(tmp / "base")
    return {"tmp": tmp, "base": base, "run": lora_run(tmp / "run", base, seed=1)}


@pytest.fixture(scope="module")
def reference(run):
    loaded = load_run(run["run"])
    ids = loaded.template.prompt_ids(MSG)
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]
        base_logits = AutoModelForCausalLM.from_pretrained(run["base"])(input_ids=torch.tensor([ids])).logits[0]
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapter really changes the model
    return {"ids": ids, "logits": logits, "loaded": loaded}


def test_merged_fp32_equals_adapter_model_in_plain_transformers(run, reference):
    out = export_run(run["run"], run["tmp"] / "merged", merge=True)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no gemcut, no peft
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([reference["ids"]])).logits[0]
    torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(out)  # carries the run's chat template
    assert list(tok.apply_chat_template(MSG, add_generation_prompt=True, tokenize=True, return_dict=False)) == reference["ids"]
    gen = GenerationConfig.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    for side in ("template.json", "chat_template.jinja", "gemcut_run.json", "export.json"):
        assert (out / side).is_file()
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "transformers-safetensors" and info["bytes"]["weights"] > 0


def test_bf16_export_is_half_the_size_and_close(run, reference):
    out = export_run(run["run"], run["tmp"] / "merged-bf16", merge=True, dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([reference["ids"]])).logits[0].float()
    assert (logits - reference["logits"]).abs().max() < 0.05
    fp32 = json.loads((run["tmp"] / "merged" / "export.json").read_text()) if (run["tmp"] / "merged").exists() else None
    if fp32:
        assert json.loads((out / "export.json").read_text())["bytes"]["weights"] < 0.6 * fp32["bytes"]["weights"]


def test_adapter_export_loads_with_peft_on_the_base(run, reference):
    from peft import PeftModel

    out = export_run(run["run"], run["tmp"] / "adapter", merge=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["base"]), out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([reference["ids"]])).logits[0]
    torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=1e-4)


def test_int8_export_loads_agrees_and_answers(run, reference):
    out = export_run(run["run"], run["tmp"] / "int8", merge=True, quantize="int8")
    info = json.loads((out / "export.json").read_text())
    rep = info["int8_report"]
    assert rep["weights_bytes"]["int8"] < rep["weights_bytes"]["float32"]
    assert rep["quality"]["top1_agreement"] > 0.9 and rep["tokens_per_second"]["int8"] > 0
    model, tok = load_int8(out)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([reference["ids"]])).logits[0]
    agree = (logits.argmax(-1) == reference["logits"].argmax(-1)).float().mean()
    assert agree > 0.9 and (logits - reference["logits"]).abs().max() < 0.1

    from gemcut.serve.registry import ModelRegistry
    from gemcut.serve.settings import ServeSettings
    from gemcut.serve.worker import GenJob, Worker

    served = ModelRegistry(ServeSettings()).add(str(out), name="int8")
    worker = Worker(ServeSettings())
    worker.start()
    try:
        result = worker.submit(GenJob(served, prompts=[served.template.prompt_ids(MSG)], max_new_tokens=5)).result(timeout=60)
    finally:
        worker.stop()
    assert len(result) == 1 and result[0].finish_reason in ("stop", "length") and len(result[0].token_ids) <= 5
    assert result[0].finish_reason == "stop" or len(result[0].token_ids) == 5


def test_export_refuses_bad_requests(run):
    with pytest.raises(GemcutError, match="needs --merge"):
        export_run(run["run"], run["tmp"] / "x", merge=False, quantize="int8")
    with pytest.raises(GemcutError, match="dtype"):
        export_run(run["run"], run["tmp"] / "y", dtype="fp8")
    (run["tmp"] / "taken").mkdir()
    (run["tmp"] / "taken" / "file").write_text("x")
    with pytest.raises(GemcutError, match="not empty"):
        export_run(run["run"], run["tmp"] / "taken")


def test_export_command(run):
    from typer.testing import CliRunner

    from gemcut.cli import app, register_commands

    register_commands()
    out = run["tmp"] / "cli-int8"
    result = CliRunner().invoke(app, ["export", str(run["run"]), "--quantize", "int8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "gemcut-int8" in result.output and "perplexity" in result.output and (out / "quantize_config.json").is_file()
    bad = CliRunner().invoke(app, ["export", str(run["run"]), "--no-merge", "--quantize", "int8", "--out", str(run["tmp"] / "z")])
    assert bad.exit_code != 0


def test_plain_transformers_refuses_an_int8_export(run):
    """An int8 folder must not load as a randomly initialised model in the standard tool."""
    from transformers import AutoModelForCausalLM

    out = export_run(run["run"], run["tmp"] / "int8-plain", merge=True, quantize="int8", report=False)
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gemcut-int8"
    assert "gemcut.export.load_int8" in config["quantization_config"]["load_with"]
    model, _ = load_int8(out)  # gemcut's own loader still reads it
    assert type(model).__name__ == "LlamaForCausalLM"
