"""The shared numerics (gemcut/models/numerics.py, the shared-prefix cut): the formulas they replaced, exactly."""

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny import tiny_bert_classifier, tiny_llama, tiny_tokenizer

from gemcut.data.collate import IGNORE
from gemcut.models.numerics import classifier_logits, right_pad, token_logps, token_nll, unwrap_peft
from gemcut.models.shared_prefix import MIN_SHARED_TOKENS, prefix_to_share

torch.set_num_threads(1)


def _logits_and_targets(dtype=torch.float32):
    torch.manual_seed(0)
    logits = (torch.randn(3, 6, 50) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (3, 6))
    targets[0, :2] = IGNORE
    targets[2, 4:] = IGNORE
    return logits, targets


def test_token_logps_equals_the_log_softmax_gather_formula_with_its_gradient():
    # The formula DPO and the RL losses used before the one module: fp32 log-softmax, gathered, 0 where ignored.
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets = _logits_and_targets(dtype)
        valid = targets != IGNORE
        want = torch.log_softmax(logits.float(), -1).gather(-1, targets.masked_fill(~valid, 0)[..., None])[..., 0] * valid
        (want_grad,) = torch.autograd.grad(want.sum(), logits)
        got = token_logps(logits, targets)
        (got_grad,) = torch.autograd.grad(got.sum(), logits)
        assert got.dtype == torch.float32 and got.shape == targets.shape
        assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_token_nll_is_cross_entropy_at_targets_and_zero_where_ignored():
    logits, targets = _logits_and_targets()
    got = token_nll(logits, targets)
    keep = targets != IGNORE
    assert torch.equal(got[keep], F.cross_entropy(logits[keep].float(), targets[keep], reduction="none"))
    assert torch.all(got[~keep] == 0)
    flat = token_nll(logits[keep], targets[keep])  # [N, V] and [N] work alike
    assert torch.equal(flat, got[keep])


def test_classifier_logits_of_padded_batches_equal_each_row_alone():
    tok = tiny_tokenizer()
    model = tiny_bert_classifier(tok, num_labels=3, seed=1).eval()
    rows = [tok(t)["input_ids"] for t in ["i love this", "i hate waiting, this is terrible", "okay", "a b c d e f"]]
    seen = []
    got = classifier_logits(model, tok, rows, batch_size=3, progress=seen.append)
    assert got.shape == (4, 3) and got.dtype == torch.float32 and seen == [3, 1]
    for row, logits in zip(rows, got):
        alone = model(input_ids=torch.tensor([row])).logits[0].float()
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-6)


def test_right_pad_gives_an_empty_row_one_position_to_read():
    ids, mask = right_pad([[5, 6], []], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_unwrap_peft():
    model = tiny_llama(tiny_tokenizer())
    assert unwrap_peft(model) is model
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrap_peft(wrapped) is model


def test_prefix_to_share_stops_before_the_first_predicting_column():
    n = MIN_SHARED_TOKENS + 4
    ids = torch.arange(n + 3).repeat(2, 1)
    ids[1, -1] = 999  # rows differ in their last column only
    mask = torch.ones_like(ids)
    nothing = torch.zeros_like(ids, dtype=torch.bool)
    assert prefix_to_share(ids, mask, nothing) == n + 2
    predicting = nothing.clone()
    predicting[1, n] = True
    assert prefix_to_share(ids, mask, predicting) == n
    predicting[0, MIN_SHARED_TOKENS - 1] = True  # too short a prefix to be worth a forward call of its own
    assert prefix_to_share(ids, mask, predicting) == 0
