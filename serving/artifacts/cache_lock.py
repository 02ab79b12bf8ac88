"""Build-once files in a cache that several pods share (a ReadWriteMany volume): one builds, the others wait.

`build_once(target, build)` checks for `target`, and when it is missing takes an exclusive advisory lock on
`<target>.lock` beside it, checks again (another holder may have built it meanwhile), builds into
`<target>.partial.<host>.<pid>` and renames that into place. Readers never see a half-written file: `target` only
ever appears whole, by rename.

The lock is flock(2). The kernel drops it when its holder dies, however it dies, so a pod killed mid-build frees the
next one, which finds no `target`, removes the dead one's `.partial.*` and builds again. On NFS, Linux emulates
flock with NFSv4 byte-range locks: a holder's own death releases them at once; a node that vanishes keeps them until the
server's lease runs out (90 s by default). A wait is bounded all the same (a build hung on a live pod holds its lock
indefinitely): past `timeout_s` the waiter gives up with CacheLockTimeoutError instead of waiting forever.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from serving.errors import OmniGen2Error

log = logging.getLogger("export.cache_lock")
POLL_S = 1.0  # a non-blocking retry loop, not a blocking flock: the wait must end at its deadline
LOG_EVERY_S = 60.0


class CacheLockTimeoutError(OmniGen2Error):
    """Another builder held the lock past the wait's bound: that build is hung, or slower than the bound."""


@contextmanager
def exclusive_lock(lock_path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created if missing; never deleted, so every builder locks the same
    inode) for the block's duration, waiting at most `timeout_s` for it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        started = time.monotonic()
        next_log = started
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= timeout_s:
                    raise CacheLockTimeoutError(
                        f"{what}: another builder held {lock_path} for over {timeout_s:.0f} s: "
                        "its build is hung, or slower than this bound"
                    ) from None
                if time.monotonic() >= next_log:
                    log.info(
                        "%s: another builder holds %s; waiting for it (%.0f of at most %.0f s)",
                        what,
                        lock_path,
                        waited,
                        timeout_s,
                    )
                    next_log += LOG_EVERY_S
                time.sleep(POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _present(target: Path) -> bool:
    """Whether `target` exists, looked up through a fresh listing of its folder: an NFS client may cache a missing
    name's lookup for a while after another client created it, and reading the folder revalidates it."""
    try:
        return target.name in os.listdir(target.parent) and target.is_file()
    except FileNotFoundError:
        return False


def build_once(target: Path, build: Callable[[Path], object], timeout_s: float, what: str | None = None) -> bool:
    """Make sure `target` exists: `build(partial_path)` writes it aside, and it is renamed into place. Returns True
    when this call built it, False when it was there (or another builder made it while this one waited)."""
    what = what or target.name
    if _present(target):
        return False
    with exclusive_lock(target.with_name(target.name + ".lock"), timeout_s, what):
        if _present(target):
            log.info("%s: built by another builder meanwhile, reused", what)
            return False
        # Leftovers of builders that lost the lock (dead, or cut off past the NFS lease) go; this builder's own
        # aside name means such a builder, still running, can never rename a file of this one into place.
        for leftover in target.parent.glob(f"{glob.escape(target.name)}.partial.*"):
            leftover.unlink(missing_ok=True)
        partial = target.with_name(f"{target.name}.partial.{socket.gethostname()}.{os.getpid()}")
        try:
            build(partial)
            with open(partial, "rb") as written:  # on the server before the name appears (NFS: close-to-open)
                os.fsync(written.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
    return True
