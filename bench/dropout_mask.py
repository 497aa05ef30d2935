"""One dropout site, forward and backward, with torch's `F.dropout` and with gemcut's fast dropout, side by
side in one process, alternating so that machine drift hits both; reports milliseconds and the ratio.

    python bench/dropout_mask.py                       # MiniLM's two shapes at batch 32, length 48, p 0.1
    python bench/dropout_mask.py --shape 32,48,384 --p 0.1 --reps 7 --iters 50

Shapes: a hidden state [batch, length, 384] (the residual-branch and embedding dropout of
all-MiniLM-L6-v2) and its attention probabilities [batch, 12, length, length]. Each timing is a forward
pass and a backward pass of `dropout(x)` with a gradient of ones; "baseline" times the same with `x * 1.0`
(the autograd and allocation overhead both sides share). The kept fraction of each side is printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from gemcut.models.fast.fast_dropout import fast_dropout


def time_site(fn, x0: torch.Tensor, iters: int) -> float:
    """Mean milliseconds of forward + backward of `fn` on a fresh leaf copy of x0."""
    def once():
        x = x0.detach().requires_grad_()
        y = fn(x)
        y.backward(torch.ones_like(y))
    once()
    t = time.perf_counter()
    for _ in range(iters):
        once()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="comma-separated tensor shape (repeatable)")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=5, help="alternating rounds; the median is reported")
    ap.add_argument("--iters", type=int, default=30, help="forward+backward passes per round")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else [(32, 48, 384), (32, 12, 48, 48)]
    torch.manual_seed(0)
    sides = {
        "torch": lambda x: F.dropout(x, args.p, True),
        "fast": lambda x: fast_dropout(x, args.p, True),
        "baseline": lambda x: x * 1.0,
    }
    results = []
    for shape in shapes:
        x0 = torch.randn(shape)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.reps):
            for name, fn in sides.items():
                times[name].append(time_site(fn, x0, args.iters))
        ms = {name: statistics.median(t) for name, t in times.items()}
        kept = {name: (sides[name](torch.ones(shape)) != 0).float().mean().item() for name in ("torch", "fast")}
        row = {"shape": list(shape), "elements": x0.numel(), "ms": ms, "kept": kept,
               "fast_vs_torch": ms["fast"] / ms["torch"],
               "fast_vs_torch_net": (ms["fast"] - ms["baseline"]) / (ms["torch"] - ms["baseline"])}
        results.append(row)
        print(f"{str(shape):<20} torch {ms['torch']:6.2f} ms  fast {ms['fast']:6.2f} ms  baseline {ms['baseline']:5.2f} ms"
              f"  fast/torch {row['fast_vs_torch']:.2f}x (net of baseline {row['fast_vs_torch_net']:.2f}x)"
              f"  kept {kept['torch']:.4f} / {kept['fast']:.4f}")
    print(json.dumps({"p": args.p, "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
