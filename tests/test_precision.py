"""gemcut/models/precision.py: one rule for "auto", one autocast context."""

from pathlib import Path

import torch

from gemcut.models.precision import autocast, resolve_precision


def test_explicit_precision_is_kept():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


def test_auto_on_cpu_follows_native_bf16(monkeypatch):
    real = Path.read_text
    for flags, want in (("flags : avx2 fma", "fp32"), ("flags : avx512_bf16 avx2", "bf16"), ("flags : amx_bf16", "bf16")):
        monkeypatch.setattr(Path, "read_text", lambda self, *a, _f=flags, **k: _f if str(self) == "/proc/cpuinfo" else real(self, *a, **k))
        assert resolve_precision("auto", "cpu") == want


def test_autocast_computes_in_bf16_only_when_asked():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
