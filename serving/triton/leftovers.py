"""What a `tritonserver` that ended without its own clean-up (killed, crashed) leaves, and only that.

Its Python-backend stubs ignore SIGTERM and outlive it, and each stub's shared-memory region in /dev/shm holds RAM
until it is unlinked. Both are found by the region names' prefix, which holds the gRPC port: a stack killed outright
leaves them to the next one started on the same ports. Those ports are free again while another stack's server is
still loading its models (it binds them last), so a name is not proof of what is left: a stub whose parent is a
live `tritonserver` is that server's, and a region some live process maps is in use.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from serving.triton.watchdog import proc_stat, stubs_by_region_prefix

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")


def region_prefix(grpc_port: int) -> str:
    """The prefix of the regions of a server on `grpc_port`. The PID namespace keeps apart the stacks of containers
    that share /dev/shm: their processes are not in this /proc, so their regions could not be told in use."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"omnigen2_triton_{namespace}_{grpc_port}_"


def _live_tritonserver(pid: int) -> bool:
    try:
        stat = proc_stat(pid)
    except (OSError, ValueError):
        return False
    return stat.name == "tritonserver" and stat.state != "Z"


def mapped_regions() -> set[str]:
    """Names of the /dev/shm files that a live process maps (of the processes this user may read)."""
    marker = f" {SHM}/"
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text(errors="replace").splitlines()
        except OSError:  # gone meanwhile, or another user's
            continue
        for line in lines:
            _, found, name = line.partition(marker)
            if found:
                mapped.add(name.removesuffix(" (deleted)"))
    return mapped


def clean_up(prefix: str) -> None:
    """Kills the stubs with a `prefix` region whose server is gone, and unlinks the `prefix` regions that no live
    process maps, besides those of the stubs killed here."""
    ended: set[str] = set()
    for pid, parent, region in stubs_by_region_prefix(prefix):
        if _live_tritonserver(parent):
            continue  # a running server's: another stack on these ports, still loading its models
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended meanwhile
        except PermissionError:
            log.warning("stub %d (region %s) is another user's: not killed", pid, region)
            continue
        ended.add(region)
    in_use = mapped_regions() - ended  # a stub just killed may not have unmapped yet
    for path in SHM.glob(f"{prefix}*"):
        if path.name in in_use:
            continue
        try:
            path.unlink(missing_ok=True)
        except PermissionError:
            log.warning("%s is another user's: not removed", path)
