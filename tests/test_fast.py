"""`train.fast` is one switch: off, a model runs transformers' own forwards; on, the tricks of
gemcut/models/fast/ give the same logits, gradients and training losses; and a transformers release that
moves what a trick relies on fails by name."""

import copy

import pytest
import torch
import transformers
from test_padding_free import _batch
from tiny import ENCODER_CLASSIFIERS, SMALL_ENCODER, classifiers_read_elsewhere, encoder_classifier, save_tiny_bert

from gemcut.config import ModelConfig, TrainConfig
from gemcut.models.adapters import apply_adapter
from gemcut.models.fast import TRICKS, FastPathError, applied, apply_fast
from gemcut.models.fast.bert_layout import missing
from gemcut.models.fast.fast_dropout import use_fast_dropout
from gemcut.models.fast.first_token import last_layer_reads_first_token_only
from gemcut.models.fast.padding_free import use_padding_free_encoder
from gemcut.models.load import load_base
from gemcut.models.pooling import classifier_pooling
from gemcut.tasks import task_named

CLASSIFY = task_named("classify")
PATCH = {"padding_free": use_padding_free_encoder, "first_token": last_layer_reads_first_token_only,
         "fast_dropout": use_fast_dropout}
# The tolerances of the exactness tests beside each trick (tests/test_padding_free.py, test_first_token.py).
LOGITS = dict(rtol=1e-5, atol=1e-6)
GRADS = dict(rtol=1e-4, atol=1e-6)


def _xlm_roberta():
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    return XLMRobertaForSequenceClassification(XLMRobertaConfig(**SMALL_ENCODER, pad_token_id=1))


HEADS = {**{name: (lambda name=name: encoder_classifier(name)) for name in ENCODER_CLASSIFIERS}, "xlm-roberta": _xlm_roberta}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("trick", TRICKS)
def test_what_each_trick_relies_on_is_in_the_installed_transformers(trick, head):
    """Fails naming the trick and each attribute a transformers upgrade moved, e.g. `BertSelfAttention.scaling`."""
    gone = missing(HEADS[head](), TRICKS[trick].RELIES_ON)
    assert not gone, (f"gemcut/models/fast/{trick}.py relies on {', '.join(gone)}, which transformers "
                      f"{transformers.__version__} does not have for {head}")


@pytest.mark.parametrize("trick", TRICKS)
def test_a_moved_attribute_is_an_error_naming_the_trick_and_the_attribute(trick):
    model = encoder_classifier("bert")
    del model.bert.encoder.layer[-1].attention.self.query  # what a rename in transformers would look like
    assert missing(model, TRICKS[trick].RELIES_ON) == ["BertSelfAttention.query"]
    with pytest.raises(FastPathError, match=rf"the {trick} speed trick .*relies on BertSelfAttention\.query.*train\.fast=false"):
        PATCH[trick](model)
    with pytest.raises(FastPathError, match="BertSelfAttention.query"):
        apply_fast(model, CLASSIFY, TrainConfig())
    assert "forward" not in vars(model.bert.encoder)  # nothing was half-applied before the check


def test_a_method_moved_on_the_class_is_named_too(monkeypatch):
    from transformers.models.bert.modeling_bert import BertLayer

    monkeypatch.delattr(BertLayer, "feed_forward_chunk")
    with pytest.raises(FastPathError, match=r"padding_free .*BertLayer\.feed_forward_chunk"):
        apply_fast(encoder_classifier("bert"), CLASSIFY, TrainConfig())


def _loaded(folder, pooling: str, fast: bool, fast_dropout: bool = True):
    """The tiny BERT classifier as a run loads it (the same new head: seeded), with `apply_fast` done."""
    torch.manual_seed(0)
    model, _ = load_base(ModelConfig(name=str(folder), pooling=pooling, dropout=0.0), "classify", label_names=["a", "b", "c"])
    return model, apply_fast(model, CLASSIFY, TrainConfig(fast=fast, fast_dropout=fast_dropout))


def _plain_forwards(model) -> bool:
    """No module of `model` has a forward of its own instance: every forward is transformers' (or torch's)."""
    return not any("forward" in vars(module) for module in model.modules())


def _steps(model, batch, steps: int = 3):
    """Per-step losses, the first step's gradients and the final logits of a few AdamW steps in train mode."""
    ids, mask, labels = batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses, first_grads = [], None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        losses.append(loss.item())
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return torch.tensor(losses), first_grads, model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("pooling, tricks", [("cls", ["padding_free", "first_token", "fast_dropout"]),
                                             ("mean", ["padding_free", "fast_dropout"])])
def test_fast_off_runs_transformers_forwards_with_the_same_results(tmp_path, pooling, tricks):
    folder = save_tiny_bert(tmp_path / "bert")
    plain, plain_applied = _loaded(folder, pooling, fast=False)
    fast, fast_applied = _loaded(folder, pooling, fast=True)
    assert plain_applied == applied(plain) == [] and _plain_forwards(plain)
    assert fast_applied == applied(fast) == tricks and not _plain_forwards(fast)
    assert classifier_pooling(plain) == classifier_pooling(fast) == pooling  # the head is not a trick
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(input_ids=batch[0], attention_mask=batch[1]).logits,
                                   plain.eval()(input_ids=batch[0], attention_mask=batch[1]).logits, **LOGITS)
    want_losses, want_grads, want_logits = _steps(plain, batch)
    got_losses, got_grads, got_logits = _steps(fast, batch)
    torch.testing.assert_close(got_losses, want_losses, **LOGITS)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **GRADS, msg=name)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)


def test_fast_dropout_follows_its_own_switch_under_fast(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert")
    assert _loaded(folder, "cls", fast=True, fast_dropout=False)[1] == ["padding_free", "first_token"]
    model, tricks = _loaded(folder, "cls", fast=False, fast_dropout=True)
    assert tricks == [] and not any(type(m).__name__ == "FastDropout" for m in model.modules())


def test_apply_fast_fits_the_task_and_the_model():
    bert = encoder_classifier("bert")
    # A causal LM gets the dropout trick alone; the classifier tricks are for classifier heads.
    assert apply_fast(copy.deepcopy(bert), task_named("causal_lm"), TrainConfig()) == ["fast_dropout"]
    assert apply_fast(copy.deepcopy(bert), task_named("reward"), TrainConfig()) == ["padding_free", "first_token", "fast_dropout"]
    decoder, flex = classifiers_read_elsewhere()
    assert "padding_free" not in apply_fast(decoder, CLASSIFY, TrainConfig())
    assert "padding_free" not in apply_fast(flex, CLASSIFY, TrainConfig())
    # Applied twice, or through a LoRA wrapper: the same tricks, installed once.
    from gemcut.config import AdapterConfig

    model = apply_adapter(copy.deepcopy(bert), AdapterConfig(method="lora", r=4, target_modules=["query", "value"]), "classify")
    assert apply_fast(model, CLASSIFY, TrainConfig()) == apply_fast(model, CLASSIFY, TrainConfig()) == applied(model)
    assert applied(model) == ["padding_free", "first_token", "fast_dropout"]
