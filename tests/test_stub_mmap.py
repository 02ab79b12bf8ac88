"""Triton's stubs inherit its fixed 1 MiB mmap threshold (launcher.py) and take glibc's ceiling instead
(memory.use_stub_mmap_threshold): at 1 MiB each large tensor was mapped and unmapped afresh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.triton.launcher import MMAP_THRESHOLD, MMAP_THRESHOLD_ENV, STUB_MMAP_THRESHOLD
from serving.triton.memory import STUB_MMAP_THRESHOLD_ENV

# Whether a fresh 4 MiB malloc block is mapped on its own: glibc marks such a chunk IS_MMAPPED (0x2) in the size
# word just before the pointer it returns.
PROBE = """
import ctypes, ctypes.util, sys
from serving.triton.memory import use_stub_mmap_threshold
if sys.argv[1] == "stub":
    use_stub_mmap_threshold()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(4 << 20)
print(bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2))
"""


@pytest.mark.parametrize(("role", "mapped"), [("triton", True), ("stub", False)])
def test_stubs_take_their_own_threshold(role: str, mapped: bool) -> None:
    env = {**os.environ, MMAP_THRESHOLD_ENV: str(MMAP_THRESHOLD), STUB_MMAP_THRESHOLD_ENV: str(STUB_MMAP_THRESHOLD)}
    answer = subprocess.run([sys.executable, "-c", PROBE, role], env=env, capture_output=True, text=True, check=True)
    assert answer.stdout.strip() == str(mapped)
