"""The last layer of a first-token classifier computes position 0 only, and nothing the model outputs changes."""

import copy

import pytest
import torch
from tiny import ENCODER_CLASSIFIERS, classifiers_read_elsewhere, encoder_classifier, logits_and_grads
from tiny import padded_classifier_batch as _batch

from gemcut.models.fast.first_token import installed, last_layer_reads_first_token_only


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ENCODER_CLASSIFIERS)
def test_patched_classifier_gives_the_same_logits_and_gradients(name, attn):
    torch.manual_seed(0)
    reference = encoder_classifier(name, attn).train()
    patched = copy.deepcopy(reference)
    assert last_layer_reads_first_token_only(patched) and installed(patched) and not installed(reference)
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
    model = encoder_classifier("bert").eval()
    assert last_layer_reads_first_token_only(model)
    ids, mask, _ = _batch()
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[3:, :4], attention_mask=mask[3:, :4]).logits
    torch.testing.assert_close(batched[3:], alone, rtol=1e-5, atol=1e-6)


def test_models_that_read_other_positions_are_left_alone():
    for model in classifiers_read_elsewhere():
        assert not last_layer_reads_first_token_only(model)
