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
import time
from pathlib import Path

from serving.triton.watchdog import ProcStat, proc_stat, processes, stubs_by_region_prefix, stubs_of_repository

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
LAUNCHER_ENV = "OMNIGEN2_TRITON_LAUNCHER"  # a server's environment: the pid of the process that started it


def pid_namespace() -> int:
    """This process's PID namespace (0 where it cannot be read): what it leaves in a place other containers share
    carries it, as their processes are not in this /proc to tell theirs in use."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def region_prefix(grpc_port: int) -> str:
    """The prefix of the regions of a server on `grpc_port`; the PID namespace keeps apart the stacks of containers
    that share /dev/shm."""
    return f"omnigen2_triton_{pid_namespace()}_{grpc_port}_"


def is_live_server(stat: ProcStat) -> bool:
    return stat.name == "tritonserver" and stat.state != "Z"


def _live_tritonserver(pid: int) -> bool:
    try:
        return is_live_server(proc_stat(pid))
    except (OSError, ValueError):
        return False


def _launcher(pid: int) -> int | None:
    """The pid of the process that started server `pid`, as its launcher wrote it into the server's environment
    (LAUNCHER_ENV); None for a server started before launchers did, or one whose environment cannot be read."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    key = f"{LAUNCHER_ENV}=".encode()
    found = [entry.removeprefix(key) for entry in environ if entry.startswith(key)]
    return int(found[0]) if found and found[0].isdigit() else None


def _runs_python(pid: int) -> bool:
    """Whether `pid` runs a Python interpreter, as every launcher does; one whose program cannot be read is taken for
    not."""
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("python")
    except OSError:
        return False


def _launcher_lives(pid: int, parent: int) -> tuple[bool, str]:
    """Whether server `pid`, whose parent is `parent`, still has the launcher that started it, and why so taken.

    A server's parent is its launcher until the launcher dies (a stack that is pid 1 included); then it is pid 1 or a
    subreaper, which existed while the launcher did and so has another pid than the one the server's environment
    names. A server from before that
    name (one without the parent-death signal too) is taken for a live launcher's when its parent, not pid 1, runs
    Python: a Python subreaper's orphan of that age is left alone."""
    launcher = _launcher(pid)
    if launcher is not None:
        if parent == launcher:
            return True, f"its launcher, pid {parent}, is running"
        return False, f"its launcher, pid {launcher}, ended and pid {parent} took it over"
    if parent != 1 and _runs_python(parent):
        return True, f"it names no launcher, and its parent, pid {parent}, runs Python: taken for its launcher"
    return False, f"it names no launcher, and its parent is pid {parent}, " + (
        "init" if parent == 1 else "no Python launcher"
    )


def end_orphaned_server(prefix: str, timeout: float = 5.0) -> list[int]:
    """Kills this user's `tritonserver`s started with the region `prefix` (on these ports, in this PID namespace)
    whose launcher has died, and waits until they have ended (their ports are then free); returns their pids. A stack
    killed before its Triton had a parent-death signal (serving/triton/lifeline.py) left one, holding the ports."""
    argument = f"shm-region-prefix-name={prefix}".encode()
    killed = []
    for pid, stat, argv in processes():
        if not is_live_server(stat) or not any(arg.endswith(argument) for arg in argv):
            continue
        try:
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue  # gone meanwhile
        if owner != os.getuid():
            log.warning("tritonserver %d (region prefix %s) is user %d's: left alone", pid, prefix, owner)
            continue
        lives, why = _launcher_lives(pid, stat.parent)
        if lives:
            log.info("tritonserver %d (region prefix %s) holds the Triton ports, left alone: %s", pid, prefix, why)
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue  # ended meanwhile
        log.warning("killed tritonserver %d (region prefix %s), which held the Triton ports: %s", pid, prefix, why)
        killed.append(pid)
    deadline = time.monotonic() + timeout
    while any(map(_live_tritonserver, killed)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


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


def clean_up(prefix: str, repository: Path | None = None) -> None:
    """Kills the stubs with a `prefix` region, or of a model in `repository`, whose server is gone, and unlinks the
    `prefix` regions and those stubs' regions that no live process maps, besides those of the stubs killed here.

    By repository too: a stack stopped while Triton loaded its models left the stub loading one, and a restart on
    other ports (another prefix) never found it."""
    ended: set[str] = set()
    stubs = stubs_by_region_prefix(prefix) + (stubs_of_repository(repository) if repository is not None else [])
    for pid, parent, region in stubs:
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
    for path in {*SHM.glob(f"{prefix}*"), *(SHM / region for region in ended)}:
        if path.name in in_use:
            continue
        try:
            path.unlink(missing_ok=True)
        except PermissionError:
            log.warning("%s is another user's: not removed", path)
