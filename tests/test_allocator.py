"""keep_freed_memory: large tensors come from glibc's heap instead of fresh mmaps, so freed pages are reused."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, sys
import torch
from gemcut.train.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
before = libc.mallinfo2().hblkhd
t = torch.zeros(30522, 384)  # the size of all-MiniLM-L6-v2's word-embedding gradient, 47 MB
mmapped = libc.mallinfo2().hblkhd - before
del t
arena_after_free = libc.mallinfo2().arena
print(json.dumps({"applied": applied, "mmapped": mmapped, "arena_after_free": arena_after_free}))
"""


def _probe(env_value: str) -> dict:
    env = {**os.environ, "GEMCUT_KEEP_FREED_MEMORY": env_value}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_tensors_stay_in_the_heap():
    on, off = _probe("1"), _probe("0")
    assert off == {**off, "applied": False} and off["mmapped"] >= 30522 * 384 * 4  # glibc's default: a fresh mmap
    assert on["applied"] is True and on["mmapped"] == 0  # served from the heap
    assert on["arena_after_free"] >= 30522 * 384 * 4  # and kept there after `del`, warm for the next step
