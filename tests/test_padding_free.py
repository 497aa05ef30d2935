"""The padding-free encoder gives a first-token classifier the logits and gradients of the padded one."""

import copy

import pytest
import torch
from tiny import (
    ENCODER_CLASSIFIERS,
    SMALL_ENCODER,
    classifiers_read_elsewhere,
    encoder_classifier,
    logits_and_grads,
    save_tiny_bert,
)
from transformers import BertConfig, BertForSequenceClassification

from gemcut.config import AdapterConfig, ModelConfig, TrainConfig
from gemcut.models.adapters import apply_adapter
from gemcut.models.fast import applied, apply_fast
from gemcut.models.fast.fast_dropout import use_fast_dropout
from gemcut.models.fast.padding_free import ATTENTION_CHUNK_ROWS, installed, packing_for, use_padding_free_encoder
from gemcut.models.load import load_base
from gemcut.tasks import task_named
from gemcut.train.batches import resolve_group_by_length

SMALL = SMALL_ENCODER
PAD = 1
# 19 rows: three attention chunks of 8, 8 and 3 rows once sorted longest first; the first chunk's rows are
# all full length (no mask), the others mix lengths.
LENGTHS = [13, 3, 13, 7, 13, 13, 1, 9, 13, 13, 2, 13, 5, 13, 11, 4, 6, 8, 10]


def _batch(lengths=LENGTHS, width=13, left_padded=False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, SMALL["vocab_size"], (len(lengths), width), generator=g)
    positions = torch.arange(width)
    lengths_t = torch.tensor(lengths)[:, None]
    mask = (positions >= width - lengths_t) if left_padded else (positions < lengths_t)
    ids[~mask] = PAD
    return ids, mask.long(), torch.arange(len(lengths)) % 3


def _assert_same(got_model, want_model, batch):
    want_logits, want_grads = logits_and_grads(want_model, *batch)
    got_logits, got_grads = logits_and_grads(got_model, *batch)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)




@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ENCODER_CLASSIFIERS)
def test_same_logits_and_gradients_as_the_padded_model(name, attn):
    torch.manual_seed(0)
    reference = encoder_classifier(name, attn).train()
    padding_free = copy.deepcopy(reference)
    assert use_padding_free_encoder(padding_free) and installed(padding_free)
    assert not installed(reference)
    _assert_same(padding_free, reference, _batch())
    # Parameter names are untouched, so checkpoints and exports are the same files.
    assert list(padding_free.state_dict()) == list(reference.state_dict())
    # A batch with no padding at all takes the same path without any gather.
    _assert_same(padding_free, reference, _batch(lengths=[13] * 10))


def test_the_packing_holds_every_real_token_once_and_chunks_rows_longest_first():
    ids, mask, _ = _batch()
    packing = packing_for(mask.bool(), *mask.shape, torch.device("cpu"))
    assert sorted(packing.tokens.tolist()) == mask.reshape(-1).nonzero().squeeze(1).tolist()
    assert [c.rows for c in packing.chunks] == [ATTENTION_CHUNK_ROWS, ATTENTION_CHUNK_ROWS, 3]
    assert [c.length for c in packing.chunks] == [13, 11, 3]
    assert packing.chunks[0].key_mask is None and packing.chunks[1].key_mask is not None
    # Each row's first token, read through the packing, is that row's first input token.
    packed_ids = ids.reshape(-1)[packing.tokens]
    assert packed_ids[packing.first][packing.restore].tolist() == ids[:, 0].tolist()


def test_left_padding_falls_back_to_the_padded_forward():
    torch.manual_seed(0)
    reference = encoder_classifier("bert").train()
    padding_free = copy.deepcopy(reference)
    use_padding_free_encoder(padding_free)
    left = _batch(left_padded=True)
    assert packing_for(left[1].bool(), *left[1].shape, torch.device("cpu")) is None
    _assert_same(padding_free, reference, left)


def test_attention_dropout_is_applied_with_torch_and_with_fast_dropout():
    """Training mode must still drop attention probabilities (the packed path computes attention itself)."""
    config = {**SMALL, "attention_probs_dropout_prob": 0.5}
    torch.manual_seed(0)
    plain = BertForSequenceClassification(BertConfig(**config))
    use_padding_free_encoder(plain)
    fast = copy.deepcopy(plain)
    use_fast_dropout(fast)
    ids, mask, _ = _batch()
    for model in (plain, fast):
        with torch.no_grad():
            evaluated = model.eval()(input_ids=ids, attention_mask=mask).logits
            first = model.train()(input_ids=ids, attention_mask=mask).logits
            second = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(first, evaluated) and not torch.allclose(first, second)


def test_lora_on_a_padding_free_model_trains_the_same_adapters():
    torch.manual_seed(0)
    reference = encoder_classifier("bert")
    padding_free = copy.deepcopy(reference)
    use_padding_free_encoder(padding_free)
    lora = AdapterConfig(method="lora", r=4, alpha=8, target_modules=["query", "key", "value", "dense"])
    torch.manual_seed(1)
    reference = apply_adapter(reference, lora, "classify").train()
    torch.manual_seed(1)
    padding_free = apply_adapter(padding_free, lora, "classify").train()
    assert installed(padding_free)  # seen through the peft wrapper
    for model in (reference, padding_free):  # non-zero B matrices, so the adapters change the logits
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    _assert_same(padding_free, reference, _batch())


def test_apply_fast_installs_it_on_encoder_classifiers_only(tmp_path):
    model, _ = load_base(ModelConfig(name=str(save_tiny_bert(tmp_path / "bert"))), "classify", label_names=["a", "b", "c"])
    assert not installed(model)  # loading alone runs transformers' own forward
    assert apply_fast(model, task_named("classify"), TrainConfig())[:2] == ["padding_free", "first_token"]
    assert installed(model)
    for other in classifiers_read_elsewhere():
        assert not use_padding_free_encoder(other)
        assert "padding_free" not in apply_fast(other, task_named("classify"), TrainConfig())


def test_group_by_length_auto_keeps_random_batches_for_padding_free_models():
    padded = encoder_classifier("bert")
    padding_free = copy.deepcopy(padded)
    use_padding_free_encoder(padding_free)
    assert resolve_group_by_length("auto", "padding_free" in applied(padded)) is True
    assert resolve_group_by_length("auto", "padding_free" in applied(padding_free)) is False
    assert resolve_group_by_length(True, True) is True and resolve_group_by_length(False, False) is False


def test_activation_checkpointing_takes_the_padded_forward():
    """Checkpointing wraps each layer's own call; the packed path would skip it and keep every activation."""
    torch.manual_seed(0)
    model = encoder_classifier("bert").train()
    use_padding_free_encoder(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    calls = []  # the packed path calls the layers' parts, never a layer itself
    model.bert.encoder.layer[0].register_forward_hook(lambda *args: calls.append(1))
    ids, mask, labels = _batch()
    torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
    assert calls == [1]
    model.eval()  # no backward, nothing to checkpoint: packed again
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls == [1]
