"""Compute precision, decided one way for training, evaluation, the estimate and serving.

    python -m pytest -q tests/test_precision.py

`train.precision: auto` is bf16 autocast where the hardware computes bf16 natively (a CUDA GPU that
supports it; AVX-512 BF16 or AMX on a CPU) and fp32 elsewhere: on a CPU without those instructions bf16 is
emulated and slower than fp32. `autocast(precision, device)` is the context every forward of a run runs
in; weights stay fp32 (the loop may store frozen LoRA base weights in bf16, see gemcut/train/loop.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """"fp32" or "bf16" for `precision` ("auto", "fp32" or "bf16") on `device` (the default device if None)."""
    if precision != "auto":
        return precision
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for "bf16"; a no-op context for "fp32"."""
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
