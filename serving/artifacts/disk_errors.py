"""A folder the stack writes that cannot be written (a read-only file system, a full disk, no permission) is named in
one line with the flag that chose it, instead of a traceback from deep in an export or a copy."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serving.errors import SettingError

# The errors a folder's setting explains; others (a bug, a checkpoint file missing) keep their traceback.
DISK_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@contextmanager
def disk_errors_named(**folders: Path) -> Iterator[None]:
    """Within the block, an OSError of DISK_ERRORS becomes a SettingError naming the flag (`--build-dir` for
    keyword build_dir) and folder it happened in, with the errno's meaning: `--build-dir: /x: read-only file system`.
    A write error that names no file (a full disk seen by write()) is put on every folder given."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        meaning = os.strerror(exc.errno).lower()
        named = [Path(name) for name in (exc.filename, exc.filename2) if name]
        flags = {f"--{key.replace('_', '-')}": folder for key, folder in folders.items()}
        hit = [(flag, folder) for flag, folder in flags.items() if any(_inside(path, folder) for path in named)]
        if named and not hit:
            raise  # another folder's (the checkpoint's, /tmp): not one of these settings
        where = hit or list(flags.items())
        flag, folder = " or ".join(flag for flag, _ in where), " or ".join(str(folder) for _, folder in where)
        raise SettingError(flag, f"{folder}: {meaning}") from exc
