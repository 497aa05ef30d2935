"""Several LoRA runs on one base share one loaded model and are picked by name; each answers exactly as
the run loaded alone, and the base is served from the same weights with adapters switched off.

    python -m pytest -q tests/test_serve_adapters.py
"""

from __future__ import annotations

import openai
import pytest
import torch
from serve_runs import API_KEY, lora_run, plain_model, running
from transformers import AutoModelForCausalLM

from gemcut.generation import generate
from gemcut.models.load import load_run
from gemcut.serve.app import create_app
from gemcut.serve.settings import ServeSettings

MSG = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("adapters")
    base = plain_model(tmp / "base")
    return {"tmp": tmp, "base": base, "a": lora_run(tmp / "run-a", base, seed=1), "b": lora_run(tmp / "run-b", base, seed=2)}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_adapters_share_one_base_and_answer_like_their_runs(runs):
    settings = ServeSettings(models=[str(runs["a"]), str(runs["b"]), str(runs["base"])], api_keys=[API_KEY],
                             db_url=f"sqlite:///{runs['tmp'] / 'db'}")
    app = create_app(settings)
    registry = app.state.registry
    a, b, base = registry.models["run-a"], registry.models["run-b"], registry.models["base"]
    assert a.model is b.model is base.model  # one copy of the base weights
    assert (a.adapter, b.adapter, base.adapter) == ("run-a", "run-b", None)
    ids = a.template.prompt_ids(MSG)
    alone = {"run-a": load_run(runs["a"]).model, "run-b": load_run(runs["b"]).model,
             "base": AutoModelForCausalLM.from_pretrained(runs["base"]).eval()}
    expected_logits = {name: _logits(m, ids) for name, m in alone.items()}
    for x, y in (("run-a", "run-b"), ("run-a", "base"), ("run-b", "base")):
        assert not torch.allclose(expected_logits[x], expected_logits[y], atol=1e-4)  # the three models differ
    eos = a.eos_ids()
    expected_text = {name: generate(m, a.tokenizer, [ids], max_new_tokens=8, eos_ids=eos)[0].text for name, m in alone.items()}
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
        assert {m.id for m in client.models.list()} == {"run-a", "run-b", "base"}
        # Interleaved names: the adapter switches between consecutive batches.
        for name in ("run-a", "run-b", "base", "run-b", "run-a", "base"):
            r = client.chat.completions.create(model=name, messages=MSG, max_tokens=8, temperature=0)
            assert r.choices[0].message.content == expected_text[name], name
        for name in ("run-b", "base", "run-a"):
            served = registry.models[name]
            with registry.lock, served.activate():
                got = _logits(served.model, ids)
            torch.testing.assert_close(got, expected_logits[name], atol=1e-5, rtol=1e-4)


def test_lora_classifier_run_classifies_with_its_adapter(runs):
    from peft import LoraConfig, get_peft_model
    from serve_runs import classifier
    from tiny import tiny_tokenizer
    from transformers import AutoModelForSequenceClassification

    from gemcut.config import RunConfig
    from gemcut.models.load import save_final
    from gemcut.run_folder import run_meta
    from gemcut.serve.registry import ModelRegistry
    from gemcut.serve.worker import ClassifyJob, Worker

    labels = ["negative", "neutral", "positive"]
    base_dir = classifier(runs["tmp"] / "bert")
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir),
                           LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False))
    config = RunConfig.model_validate({"model": {"name": str(base_dir)}, "data": {"kind": "label", "labels": labels}})
    run_dir = runs["tmp"] / "clf-run"
    save_final(model, tiny_tokenizer(), None, run_dir / "final", labels=labels, meta=run_meta(config, "classify", labels))
    loaded = load_run(run_dir)
    texts = ["i love this product", "i hate waiting"]
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(loaded.model(**enc).logits, -1)
        with loaded.model.disable_adapter():
            without = torch.softmax(loaded.model(**enc).logits, -1)
    assert not torch.allclose(expected, without, atol=1e-4)
    registry = ModelRegistry(ServeSettings())
    served = registry.add(str(run_dir))
    assert served.task.name == "classify" and served.classifies and served.labels == labels
    worker = Worker(ServeSettings(), lock=registry.lock)
    worker.start()
    try:
        probs = worker.submit(ClassifyJob(served, texts=texts)).result(timeout=60)
    finally:
        worker.stop()
    torch.testing.assert_close(torch.tensor(probs), expected, atol=1e-5, rtol=1e-4)
