"""Process checks the tests of launchers, stubs and their clean-up share."""

from __future__ import annotations

import psutil


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie has ended (its parent has not reaped it yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
