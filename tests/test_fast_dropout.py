"""Fast dropout keeps each element with probability 1 - p, is seeded by torch's generator, and changes
nothing else a model computes."""

import copy

import pytest
import torch
from tiny import padded_classifier_batch as _batch
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

import gemcut.models.fast.fast_dropout as fd
from gemcut.models.fast.fast_dropout import FastDropout, fast_dropout, installed, keep_mask, use_fast_dropout

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_keep_probability_and_scale(p):
    torch.manual_seed(0)
    mask, scale = keep_mask((1000, 1000), p)
    dropped = round(p * 65536)
    keep = 1 - dropped / 65536
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    # 1e6 independent draws: the standard error of the kept fraction is below 5e-4.
    assert abs(mask.float().mean().item() - keep) < 2.5e-3
    assert scale == pytest.approx(1 / keep, rel=1e-12)
    # Independence between neighbours (the four lanes of one random word): P(both kept) = keep^2.
    both = (mask[:, 0::2] & mask[:, 1::2]).float().mean().item()
    assert abs(both - keep * keep) < 3e-3


def test_masks_follow_the_torch_seed():
    torch.manual_seed(3)
    a, _ = keep_mask((37, 5), 0.2)
    b, _ = keep_mask((37, 5), 0.2)
    torch.manual_seed(3)
    a2, _ = keep_mask((37, 5), 0.2)
    assert torch.equal(a, a2)  # reproducible from the seed (and so from a resumed RNG state)
    assert not torch.equal(a, b)  # and a new mask per call


def test_expected_output_and_gradient():
    torch.manual_seed(0)
    x = torch.full((400, 500), 2.0, requires_grad=True)
    out = fast_dropout(x, 0.1)
    kept = out != 0
    assert out.mean().item() == pytest.approx(2.0, abs=0.01)  # unbiased: E[out] = x
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 2.0 * 65536 / (65536 - 6554)))
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 65536 / (65536 - 6554))
    assert torch.equal(fast_dropout(x, 0.1, training=False), x)
    assert torch.equal(fast_dropout(x, 0.0), x)


def test_module_is_a_drop_in():
    m = FastDropout(0.25)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.25
    x = torch.randn(8, 8)
    assert torch.equal(m.eval()(x), x)
    y = m.train()(x)
    assert ((y == 0) | torch.isclose(y, x / (1 - round(0.25 * 65536) / 65536))).all()


def _all_kept(shape, p, device="cpu"):
    return torch.ones(shape, dtype=torch.bool, device=device), 1.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("make", [
    lambda attn: BertForSequenceClassification(BertConfig(**SMALL, attn_implementation=attn)),
    lambda attn: RobertaForSequenceClassification(RobertaConfig(**SMALL, pad_token_id=1, attn_implementation=attn)),
], ids=["bert", "roberta"])
def test_patched_model_computes_what_the_model_computes(make, attn, monkeypatch):
    torch.manual_seed(0)
    reference = make(attn)
    patched = copy.deepcopy(reference)
    # 2 hidden dropouts + 1 attention site per layer, the embeddings' dropout, the head's.
    assert use_fast_dropout(patched) >= 2 * 3 + 2 and installed(patched) and not installed(reference)
    assert not any(type(m) is torch.nn.Dropout for m in patched.modules())
    assert list(patched.state_dict()) == list(reference.state_dict())
    ids, mask, labels = _batch()
    # Eval mode: the identity, so bitwise the same logits.
    assert torch.equal(patched.eval()(input_ids=ids, attention_mask=mask).logits,
                       reference.eval()(input_ids=ids, attention_mask=mask).logits)
    # Training mode with every element kept: the explicit attention path (padding mask included) and the
    # dropout sites compute exactly what the model without dropout computes, gradients too.
    monkeypatch.setattr(fd, "keep_mask", _all_kept)
    patched.train()
    reference.eval()
    got = patched(input_ids=ids, attention_mask=mask).logits
    want = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.nn.functional.cross_entropy(got, labels).backward()
    torch.nn.functional.cross_entropy(want, labels).backward()
    for (name, p), (_, q) in zip(patched.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_mode_drops_attention_probabilities(monkeypatch):
    """The attention site really draws a mask in training (p = 0.1 on the probabilities)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**SMALL, "hidden_dropout_prob": 0.0}))
    use_fast_dropout(model)
    calls = []
    real = fd.keep_mask
    monkeypatch.setattr(fd, "keep_mask", lambda shape, p, device="cpu": calls.append((tuple(shape), p)) or real(shape, p, device))
    ids, mask, _ = _batch()
    model.train()(input_ids=ids, attention_mask=mask)
    assert calls.count(((4, 4, 11, 11), 0.1)) == 2  # [batch, heads, query, key], one per layer
    calls.clear()
    model.eval()(input_ids=ids, attention_mask=mask)
    assert calls == []
