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


# Minor page faults over ten rounds of a 4 MiB block taken, written and freed, as a step's tensors are: each round
# faults its pages in afresh when the freed heap top is handed back to the system as it is freed.
REFAULTS = """
import ctypes, ctypes.util, resource
from serving.triton.memory import use_stub_mmap_threshold
use_stub_mmap_threshold()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def round_trip():
    block = libc.malloc(4 << 20)
    ctypes.memset(block, 1, 4 << 20)
    libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_stub_keeps_its_freed_heap_until_idle() -> None:
    """Fixing the mmap threshold also fixes glibc's trim threshold at 128 KiB (mallopt(3)): every freed block at the
    heap's top went back to the system and the next step's tensors faulted it in again (485 faults, 0.9 of 2.5 ms
    in the BLS's packing of a 1024x1024 step). A stub keeps it, as glibc's own rule would at its ceiling; the idle
    trimmer gives it back once the model is idle (memory.IdleTrimmer)."""
    env = {**os.environ, MMAP_THRESHOLD_ENV: str(MMAP_THRESHOLD), STUB_MMAP_THRESHOLD_ENV: str(STUB_MMAP_THRESHOLD)}
    answer = subprocess.run([sys.executable, "-c", REFAULTS], env=env, capture_output=True, text=True, check=True)
    assert int(answer.stdout) < 100  # one round alone is 1024 pages
