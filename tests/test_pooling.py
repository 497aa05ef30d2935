"""Mean pooling gives an encoder classifier's head the mean of the real tokens, on every path, with the fast
tricks (gemcut/models/fast/) on or off, and `model.pooling: auto` follows what the checkpoint was trained with."""

import copy
import json

import pytest
import torch
from test_padding_free import _batch
from tiny import ENCODER_CLASSIFIERS, classifiers_read_elsewhere, encoder_classifier, save_tiny_bert
from transformers import BertForSequenceClassification

from gemcut.config import ModelConfig, TrainConfig
from gemcut.errors import ConfigError, GemcutError
from gemcut.models.fast import apply_fast
from gemcut.models.load import load_base
from gemcut.models.pooling import classifier_pooling, prepare_classifier, sentence_transformers_pooling
from gemcut.tasks import task_named

CLASSIFY = task_named("classify")


def _reference_logits(model, ids, mask):
    """The head applied by hand to the masked mean of the plain encoder's last hidden states."""
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    mean = ((hidden * weights).sum(1) / weights.sum(1)).unsqueeze(1)  # [batch, 1, d]: where the head reads
    if isinstance(model, BertForSequenceClassification):
        return model.classifier(model.dropout(base.pooler(mean)))
    return model.classifier(mean)  # RoBERTa's and ELECTRA's heads read features[:, 0]


def _logits_and_grads(model, batch, forward):
    ids, mask, labels = batch
    model.zero_grad()
    logits = forward(model, ids, mask)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_mean_pooled(model, reference, batch):
    want_logits, want_grads = _logits_and_grads(reference, batch, _reference_logits)
    got_logits, got_grads = _logits_and_grads(model, batch, lambda m, i, a: m(input_ids=i, attention_mask=a).logits)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    # The plain BERT model also computes its pooler on the first token, which the reference never reads.
    assert got_grads.keys() <= want_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "padding-free"])
@pytest.mark.parametrize("name", ENCODER_CLASSIFIERS)
def test_mean_pooling_matches_the_hand_computed_mean(name, fast):
    torch.manual_seed(0)
    reference = encoder_classifier(name).train()
    model = copy.deepcopy(reference)
    assert prepare_classifier(model, "mean") == "mean" and classifier_pooling(model) == "mean"
    # The mean needs every token of the last layer: padding-free, but not the first-token layer.
    assert apply_fast(model, CLASSIFY, TrainConfig(fast=fast, fast_dropout=False)) == (["padding_free"] if fast else [])
    _assert_mean_pooled(model, reference, _batch())
    _assert_mean_pooled(model, reference, _batch(lengths=[13] * 5))  # no padding: no gather at all
    assert list(model.state_dict()) == list(reference.state_dict())  # no new weights


def test_mean_pooling_on_the_padded_fallbacks():
    """Left padding and activation checkpointing take the encoder's own forward; the mean is the same."""
    torch.manual_seed(0)
    reference = encoder_classifier("bert", "eager").train()
    model = copy.deepcopy(reference)
    prepare_classifier(model, "mean")
    assert apply_fast(model, CLASSIFY, TrainConfig(fast_dropout=False)) == ["padding_free"]
    _assert_mean_pooled(model, reference, _batch(left_padded=True))
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    _assert_mean_pooled(model, reference, _batch())


def test_mean_pooling_differs_from_first_token_pooling():
    """The mutation check of the tests above: the first-token model does not match the mean reference."""
    torch.manual_seed(0)
    reference = encoder_classifier("bert").eval()
    cls = copy.deepcopy(reference)
    assert prepare_classifier(cls, "cls") == "cls"
    ids, mask, _ = _batch()
    with torch.no_grad():
        assert not torch.allclose(cls(input_ids=ids, attention_mask=mask).logits, _reference_logits(reference, ids, mask), atol=1e-3)
        torch.testing.assert_close(cls(input_ids=ids, attention_mask=mask).logits, reference(input_ids=ids, attention_mask=mask).logits)


def test_mean_pooling_refuses_a_last_layer_that_computed_the_first_token_only():
    """A pooling chosen after the first-token trick would average one token: an error, never a silent mean."""
    torch.manual_seed(0)
    reference = encoder_classifier("bert").eval()
    model = copy.deepcopy(reference)
    assert apply_fast(model, CLASSIFY, TrainConfig())[:2] == ["padding_free", "first_token"]  # no pooling chosen: cls
    prepare_classifier(model, "mean")
    # The packed path asks for the pooling at each call, so it computes every token and the mean is right...
    with torch.no_grad():
        ids, mask, _ = _batch()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, _reference_logits(reference, ids, mask),
                                   rtol=1e-5, atol=1e-6)
        # ...but left padding takes the padded forward, through the first-token layer.
        ids, mask, _ = _batch(left_padded=True)
        with pytest.raises(GemcutError, match=r"prepare_classifier\) before .*apply_fast"):
            model(input_ids=ids, attention_mask=mask)


def _sentence_transformers_folder(path, **modes):
    """The sentence-transformers files next to a model folder, whose config then names a plain encoder."""
    config_file = path / "config.json"
    if config_file.is_file():
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "architectures": ["BertModel"]}))
    (path / "1_Pooling").mkdir(parents=True)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    settings = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False, **{f"pooling_mode_{k}": v for k, v in modes.items()}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(settings))
    return path


def test_sentence_transformers_pooling_is_read_from_the_checkpoint(tmp_path):
    assert sentence_transformers_pooling(_sentence_transformers_folder(tmp_path / "m", mean_tokens=True)) == "mean"
    assert sentence_transformers_pooling(_sentence_transformers_folder(tmp_path / "c", cls_token=True)) == "cls"
    assert sentence_transformers_pooling(_sentence_transformers_folder(tmp_path / "x", max_tokens=True)) is None
    assert sentence_transformers_pooling(_sentence_transformers_folder(tmp_path / "b", mean_tokens=True, max_tokens=True)) is None
    assert sentence_transformers_pooling(tmp_path / "nothing") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "modules.json").write_text("{not json")
    assert sentence_transformers_pooling(tmp_path / "broken") is None


def test_auto_follows_the_checkpoint_and_saved_models_keep_their_pooling(tmp_path):
    plain = save_tiny_bert(tmp_path / "plain")
    sentence = _sentence_transformers_folder(save_tiny_bert(tmp_path / "sentence"), mean_tokens=True)
    labels = ["a", "b", "c"]
    model, _ = load_base(ModelConfig(name=str(plain)), "classify", label_names=labels)
    assert classifier_pooling(model) == "cls"
    model, _ = load_base(ModelConfig(name=str(sentence)), "classify", label_names=labels)
    assert classifier_pooling(model) == "mean"
    model, _ = load_base(ModelConfig(name=str(sentence), pooling="cls"), "classify", label_names=labels)
    assert classifier_pooling(model) == "cls"
    # A checkpoint that is already a classifier (trained by plain transformers: first token) keeps cls.
    config_file = sentence / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "architectures": ["BertForSequenceClassification"]}))
    model, _ = load_base(ModelConfig(name=str(sentence)), "classify", label_names=labels)
    assert classifier_pooling(model) == "cls"
    # A saved classifier carries its pooling in config.json, without the sentence-transformers files.
    mean_model, _ = load_base(ModelConfig(name=str(plain), pooling="mean"), "classify", label_names=labels)
    mean_model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["classifier_pooling"] == "mean"
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert prepare_classifier(reloaded, "auto", tmp_path / "saved") == "mean"
    ids, mask, _ = _batch(width=13)
    ids = ids.clamp(max=mean_model.config.vocab_size - 1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids, attention_mask=mask).logits,
                                   mean_model.eval()(input_ids=ids, attention_mask=mask).logits)


def test_mean_pooling_is_refused_where_it_is_not_built():
    decoder, flex = classifiers_read_elsewhere()
    assert prepare_classifier(decoder, "auto") is None  # reads each row's last real token, its own way
    with pytest.raises(ConfigError, match="model.pooling=mean"):
        prepare_classifier(decoder, "mean")
    with pytest.raises(ConfigError, match="flex_attention"):
        prepare_classifier(flex, "mean")
    with pytest.raises(ConfigError, match="choose auto, cls or mean"):
        prepare_classifier(decoder, "max")
    cls = encoder_classifier("bert")
    assert prepare_classifier(cls, "cls") == prepare_classifier(cls, "auto") == "cls"  # idempotent
    with pytest.raises(ConfigError, match="already pools by cls"):
        prepare_classifier(cls, "mean")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_mean_pooled_run_reads_the_mean_in_eval_export_and_serving(tmp_path, method):
    """Trained on a sentence-transformers folder: the run, its checkpoints, its merged export and the served
    export all pool by the mean, and give the same logits."""
    from test_train_run import _config, _write_jsonl
    from tiny import CORPUS

    from gemcut.export.merge import MEAN_POOLING_WARNING, export_run
    from gemcut.models.load import load_run
    from gemcut.serve.registry import ModelRegistry
    from gemcut.serve.settings import ServeSettings
    from gemcut.train.run import train

    rows = [{"text": f"{t} {i}", "label": lab} for i in range(6)
            for t, lab in zip(CORPUS, ["positive", "negative", "neutral", "positive", "negative", "neutral", "neutral", "positive"])]
    data = _write_jsonl(tmp_path / "labels.jsonl", rows)
    base = _sentence_transformers_folder(save_tiny_bert(tmp_path / "sentence"), mean_tokens=True)
    run = train(_config(tmp_path, base, data, "mean", f"adapter.method={method}"))
    assert json.loads((run / "manifest.json").read_text())["pooling"] == "mean"
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0, 0], [10, 11, 12, 13, 14, 15, 16]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7])}
    final, last = load_run(run, "final"), load_run(run, "last")
    assert classifier_pooling(final.model) == classifier_pooling(last.model) == "mean"
    with torch.no_grad():
        want = final.model(**batch).logits
        torch.testing.assert_close(last.model(**batch).logits, want)
        exported = export_run(run, tmp_path / "export")
        info = json.loads((exported / "export.json").read_text())
        assert info["pooling"] == "mean" and info["warning"] == MEAN_POOLING_WARNING
        served = ModelRegistry(ServeSettings()).add(str(exported))
        assert classifier_pooling(served.model) == "mean"
        torch.testing.assert_close(served.model(**batch).logits, want, rtol=1e-5, atol=1e-5)
        # What plain transformers would do with the export: the first token, other logits.
        plain = BertForSequenceClassification.from_pretrained(exported).eval()
        assert not torch.allclose(plain(**batch).logits, want, atol=1e-4)
