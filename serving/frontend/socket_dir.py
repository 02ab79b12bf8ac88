"""The folder of the front end's Unix socket (the way from its HTTP gateway to its gRPC server), and what a front end
killed outright (SIGKILL, the OOM killer) left of it.

The folder, which only this user can open, is named for the PID namespace and pid of its front end:
`<tmp>/omnigen2-frontend-<namespace>-<pid>-<random>`. A front end removes its own as it stops; a new one first removes
those of this user whose front end is no longer alive in this namespace. A front end whose pid was reused keeps its
folder until that pid ends.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from serving.triton.leftovers import pid_namespace

log = logging.getLogger(__name__)

PREFIX = "omnigen2-frontend-"


def create(root: Path | None = None) -> Path:
    """A new socket folder for this process, once the folders of front ends that died are gone."""
    remove_orphans(root)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{pid_namespace()}-{os.getpid()}-", dir=root))


def remove_orphans(root: Path | None = None) -> list[Path]:
    """Removes the socket folders of this user and PID namespace whose front end is no longer alive; returns them."""
    removed = []
    for path in (root or Path(tempfile.gettempdir())).glob(f"{PREFIX}{pid_namespace()}-*-*"):
        pid = path.name.removeprefix(PREFIX).split("-")[1]
        try:
            info = path.lstat()
        except OSError:  # removed meanwhile
            continue
        if not pid.isdigit() or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s: its front end (pid %s) ended without removing it (killed?)", path, pid)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
