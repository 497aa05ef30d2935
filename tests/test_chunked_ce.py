import pytest
import torch
import torch.nn.functional as F

from gemcut.objectives import chunked_ce
from gemcut.objectives.chunked_ce import chunked_linear_cross_entropy


def _reference(hidden, weight, targets, token_weight=None):
    loss = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")
    return (loss * token_weight).sum() if token_weight is not None else loss.sum()


@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_and_gradients_equal_plain_cross_entropy(monkeypatch, weight_trains, weighted):
    monkeypatch.setattr(chunked_ce, "LOGITS_BUDGET", 3 * 50)  # 3 rows a chunk: several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (10,), generator=g)
    token_weight = torch.rand(10, generator=g, dtype=torch.float64) if weighted else None

    outs = []
    for fn in (chunked_linear_cross_entropy, _reference):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(weight_trains)
        loss = fn(h, w, targets, token_weight)
        (loss * 0.5).backward()  # a scaled upstream gradient, as in gradient accumulation
        outs.append((loss.detach(), h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = outs
    torch.testing.assert_close(l1.double(), l2.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh1, gh2, rtol=1e-6, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(gw1.double(), gw2, rtol=1e-5, atol=1e-6)
    else:
        assert gw1 is None and gw2 is None


def test_bf16_autocast_matches_the_plain_head_under_autocast():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(12, 32, generator=g)
    weight = torch.randn(64, 32, generator=g) * 0.1
    targets = torch.randint(0, 64, (12,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_linear_cross_entropy(hidden, weight, targets)
        want = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
