"""Where a model's stub stands on the CPU lane (serving/triton/cpu_lane.py), read from /proc/locks: how a test that
holds the lane knows that a call has reached it, or has taken it."""

from __future__ import annotations

from pathlib import Path

from serving.triton.cpu_lane import LOCK_FILE
from serving.triton.launcher import TritonServer


def lane_locks(server: TritonServer, pid: int) -> set[str]:
    """Process `pid`'s entries on `server`'s CPU lane: "holds" (the lock is its) and "waits" (blocked on it, `->`)."""
    inode = (server.model_repository / LOCK_FILE).stat().st_ino
    found = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if str(pid) in fields and fields[-3].endswith(f":{inode}"):
            found.add("waits" if fields[1] == "->" else "holds")
    return found
