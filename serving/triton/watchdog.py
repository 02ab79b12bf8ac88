"""Brings back a Triton model whose Python-backend stub process died.

Triton keeps such a model READY and fails every request to it ("Stub process 'x_0_0' is not healthy") until it
is reloaded. The watchdog runs beside the server it launched, on the same host: it notes each model's stub
processes (children of `tritonserver` whose command line names the model's `model.py`) and, when one vanishes,
unloads the model (health turns NOT_SERVING: the front end requires every model READY) and loads it again
(SERVING). That needs `--model-control-mode=explicit`, which reads the repository at start-up and never polls it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

log = logging.getLogger(__name__)


class ProcStat(NamedTuple):
    name: str  # the command name, as the kernel keeps it (at most 15 characters)
    state: str  # "R", "S", "Z" (a zombie: ended, not yet waited for)...
    parent: int
    started: int  # when it started, in clock ticks since boot (ticks_since_boot's scale)


def proc_stat(pid: int | str) -> ProcStat:
    """A process's /proc/<pid>/stat; OSError when it is gone or not ours to read. Its fields follow the command
    name, which may hold spaces and parentheses: they are read after the last ')'."""
    head, _, rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
    fields = rest.split()  # from the third field of proc(5)'s list: state, ppid, ..., starttime (the 22nd)
    return ProcStat(head.partition("(")[2], fields[0], int(fields[1]), int(fields[19]))


def ticks_since_boot() -> int:
    """Now, on the scale of ProcStat.started (the kernel counts a process's start from boot, suspend included)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def processes() -> Iterator[tuple[int, ProcStat, list[bytes]]]:
    """(pid, stat, argv) of the processes this user may read, from /proc."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = proc_stat(proc.name)
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        yield int(proc.name), stat, argv


def _all_stubs() -> Iterator[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, argv) of the live stub processes. A stub's argv is its `model.py`, then the name of the
    shared-memory region it talks to the server through."""
    for pid, stat, argv in processes():
        if len(argv) > 2 and argv[1].endswith(b"model.py"):
            yield pid, stat.parent, argv


def stubs_of_server(server_pid: int) -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of the live stubs `server_pid` started."""
    return ((pid, argv) for pid, parent, argv in _all_stubs() if parent == server_pid)


def stubs_by_region_prefix(prefix: str) -> list[tuple[int, int, str]]:
    """(pid, parent pid, region) of the live stubs whose shared-memory region is named `prefix...`, whichever
    process is their parent now (a dead server's are reparented)."""
    return [
        (pid, parent, argv[2].decode()) for pid, parent, argv in _all_stubs() if argv[2].startswith(prefix.encode())
    ]


def stubs_of_repository(repository: Path) -> list[tuple[int, int, str]]:
    """(pid, parent pid, region) of the live stubs of the models in `repository`, whatever their region's name (a
    server on other ports, or one from before region names held the port, started them)."""
    root = str(repository.resolve()).encode() + b"/"
    return [(pid, parent, argv[2].decode()) for pid, parent, argv in _all_stubs() if argv[1].startswith(root)]


def stub_processes(server_pid: int) -> dict[str, set[int]]:
    """Model name -> pids of its live stub processes."""
    found: dict[str, set[int]] = defaultdict(set)
    for pid, argv in stubs_of_server(server_pid):
        found[Path(argv[1].decode()).parents[1].name].add(pid)
    return found


class StubWatchdog:
    def __init__(self, server_pid: int, grpc_url: str, interval_s: float = 0.5) -> None:
        self.server_pid = server_pid
        self.client = triton_grpc.InferenceServerClient(grpc_url)
        self.interval_s = interval_s
        self.known: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-stub-watchdog", daemon=True)

    def start(self) -> StubWatchdog:
        self.known = stub_processes(self.server_pid)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def check(self) -> list[str]:
        """Reload every model that lost a stub since the last check; returns their names."""
        current = stub_processes(self.server_pid)
        lost = sorted(model for model, pids in self.known.items() if pids - current.get(model, set()))
        for model in lost:
            log.warning("a stub process of model %r died; reloading the model", model)
            try:
                self.client.unload_model(model)
                self.client.load_model(model)
            except InferenceServerException as exc:  # the server itself is going: nothing to bring back
                log.warning("reloading %r failed: %s", model, exc)
        if lost:
            # Only the reloaded models' new stubs are taken from after the reload: another model's stub that died
            # meanwhile (a reload takes seconds) stays known, so the next check reloads that model too.
            reloaded = stub_processes(self.server_pid)
            current |= {model: reloaded.get(model, set()) for model in lost}
        self.known = current
        return lost
