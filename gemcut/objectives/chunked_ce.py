"""Linear head + cross-entropy in chunks, with the gradient computed during the forward pass.

    python -m pytest -q tests/test_objectives.py -k chunked

With a 49k vocabulary the [N, V] fp32 logits are the largest tensors of a small model's step: autograd keeps
the logits, their softmax and their gradient alive at once (three N x V x 4 bytes). Here the head runs on
`chunk` rows at a time; each chunk's loss and its gradients with respect to the hidden states (and the head
weight, when it trains) are computed immediately and the logits freed, so only one chunk of logits ever
exists. The same idea as Liger Kernel's fused linear cross-entropy (Hsu et al., 2024, arXiv:2410.10989),
written with plain torch ops.

Numerics match `F.cross_entropy(hidden @ weight.T)`: the matmul runs in the autocast dtype when autocast is
on (as the plain head would), the log-softmax in fp32. `linear_cross_entropy_and_hits` also counts the rows
whose argmax logit is the target (token accuracy), from each chunk's logits while they exist: one argmax
over a chunk already in hand, no logits kept.
"""

from __future__ import annotations

import torch

LOGITS_BUDGET = 2**25  # values per chunk of logits: 128 MB in fp32


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weight, compute_dtype):
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, LOGITS_BUDGET // vocab)
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros((), dtype=torch.long, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk].to(compute_dtype)
            t = targets[s:s + chunk]
            logits = (h @ w.T).float()
            hits += (logits.argmax(dim=-1) == t).sum()  # before the logits are overwritten by their gradient
            lse = torch.logsumexp(logits, dim=-1)
            loss = lse - logits.gather(1, t[:, None]).squeeze(1)
            # d(sum_i c_i * loss_i)/d logits_i = c_i * (softmax_i - onehot(t_i)); computed in place over the logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(grad.shape[0], device=grad.device), t] -= 1
            if token_weight is not None:
                c = token_weight[s:s + chunk].float()
                loss = loss * c
                grad.mul_(c[:, None])
            loss_sum += loss.sum()
            grad = grad.to(compute_dtype)
            grad_hidden[s:s + chunk] = grad @ w
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(hits)
        return loss_sum, hits

    @staticmethod
    def backward(ctx, grad_output, grad_hits=None):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype)
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i c_i * CE(hidden_i @ weight.T, targets_i) without materialising all logits.

    Args:
        hidden: [N, H] hidden states of the target positions.
        weight: [V, H] output embedding (the LM head's weight; no bias).
        targets: [N] token ids.
        token_weight: optional [N] per-token multipliers c_i.
    Returns the summed (weighted) loss, a scalar fp32 tensor.
    """
    return linear_cross_entropy_and_hits(hidden, weight, targets, token_weight)[0]


def linear_cross_entropy_and_hits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  token_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed loss of `chunked_linear_cross_entropy`, how many rows' argmax logit equals their target): the
    second is a 0-dim int64 tensor without gradient, counted over every row whatever its `token_weight`."""
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCE.apply(hidden, weight, targets, token_weight, compute_dtype)
