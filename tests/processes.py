"""Process checks the tests of launchers, stubs and their clean-up share."""

from __future__ import annotations

import psutil

from serving.triton.watchdog import stubs_of_server


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie has ended (its parent has not reaped it yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stub_shm_regions(server_pid: int) -> set[str]:
    """The names (in /dev/shm) of the shared-memory regions of the server's live stubs."""
    return {argv[2].decode() for _, argv in stubs_of_server(server_pid)}
