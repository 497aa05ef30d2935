"""The last layer of a first-token classifier computes position 0 only, and nothing the model outputs changes."""

import copy

import pytest
import torch
from tiny import SMALL_ENCODER, logits_and_grads
from tiny import padded_classifier_batch as _batch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from gemcut.models.first_token import last_layer_reads_first_token_only

SMALL = SMALL_ENCODER


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("make", [
    lambda attn: BertForSequenceClassification(BertConfig(**SMALL, attn_implementation=attn)),
    lambda attn: RobertaForSequenceClassification(RobertaConfig(**SMALL, pad_token_id=1, attn_implementation=attn)),
    lambda attn: ElectraForSequenceClassification(ElectraConfig(**SMALL, embedding_size=32, attn_implementation=attn)),
], ids=["bert", "roberta", "electra"])
def test_patched_classifier_gives_the_same_logits_and_gradients(make, attn):
    torch.manual_seed(0)
    reference = make(attn).train()
    patched = copy.deepcopy(reference)
    assert last_layer_reads_first_token_only(patched)
    ids, mask, labels = _batch()
    want_logits, want_grads = logits_and_grads(reference, ids, mask, labels)
    got_logits, got_grads = logits_and_grads(patched, ids, mask, labels)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Parameter names are untouched, so checkpoints and exports are the same files.
    assert list(patched.state_dict()) == list(reference.state_dict())
    # The patched layer really did compute one position.
    assert patched.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.shape[1] == 1


def test_padding_changes_nothing_for_the_patched_model():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**SMALL)).eval()
    assert last_layer_reads_first_token_only(model)
    ids, mask, _ = _batch()
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[3:, :4], attention_mask=mask[3:, :4]).logits
    torch.testing.assert_close(batched[3:], alone, rtol=1e-5, atol=1e-6)


def test_models_that_read_other_positions_are_left_alone():
    decoder = LlamaForSequenceClassification(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, intermediate_size=64, num_labels=3))
    assert not last_layer_reads_first_token_only(decoder)  # reads each row's last real token
    flash_like = BertForSequenceClassification(BertConfig(**SMALL))
    flash_like.config._attn_implementation = "flex_attention"
    assert not last_layer_reads_first_token_only(flash_like)
