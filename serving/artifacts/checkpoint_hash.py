"""The checkpoint's sha256: the key of ONNX exports, TensorRT engines and model repositories.

A full checkpoint is about 16 GB, and reading all of it takes tens of seconds, so the hash is kept in a small JSON
memo (`HASH_MEMO`, in a cache folder of the caller's) with the (relative path, size, mtime_ns, inode) of every file
it covered: while none of those changes, the files are not read again. Any write through the usual tools changes
at least one of them (mtime; a copy, sync or extraction usually makes a new inode too).

Not seen: a file rewritten in place with the same size and its old mtime_ns put back on purpose (`cp -p`,
`touch -d`, `os.utime` onto a file of the same size). That is no accident of serving or of downloading a
checkpoint, so it is accepted; `checkpoint_hash` without a memo reads every byte. A file changed within
`RACY_S` of hashing is not memoised: a second write in the same clock tick could leave its mtime_ns as it was.
On a network file system that guard compares the server's file times with this machine's clock, so it holds only
while the two clocks agree within `RACY_S`.
ctime is left out on purpose: hard-linking the checkpoint into a repository (`link_or_copy`) changes it.

The value is the one of a plain read (paths and bytes in path order), so caches keyed by it stay valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("export.checkpoint_hash")
HASH_MEMO = "checkpoint_hashes.json"
RACY_S = 2.0


def _files(checkpoint: Path) -> list[tuple[str, Path, list[int]]]:
    """(relative path, path, [size, mtime_ns, inode]) of every file, in the hash's order."""
    found = []
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        stat = path.stat()
        found.append((str(path.relative_to(checkpoint)), path, [stat.st_size, stat.st_mtime_ns, stat.st_ino]))
    return found


def _read_hash(files: list[tuple[str, Path, list[int]]]) -> str:
    digest = hashlib.sha256()
    for relative, path, _ in files:
        digest.update(relative.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _load(memo: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(memo.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: hash from the bytes
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _save(memo: Path, entries: dict[str, Any]) -> None:
    """Written aside and renamed: concurrent builds never read half a memo (the last writer's entries win). The
    aside name holds the host too: pods sharing the cache may run the builder under the same pid."""
    temp = memo.with_name(f"{memo.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(entries, indent=1))
        os.replace(temp, memo)
    except OSError as error:  # a read-only cache costs a re-read next time, not the build
        log.warning("checkpoint hash memo not saved (%s)", error)
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)


def checkpoint_hash(checkpoint: Path, cache: Path | None = None) -> str:
    """sha256 over every file's relative path and bytes, memoised in `cache / HASH_MEMO` when `cache` is given."""
    files = _files(checkpoint)
    if cache is None:
        return _read_hash(files)
    memo, name = cache / HASH_MEMO, str(checkpoint.resolve())
    stats = {relative: stat for relative, _, stat in files}
    entries = _load(memo)
    known = entries.get(name)
    if isinstance(known, dict) and known.get("files") == stats and isinstance(known.get("sha256"), str):
        return str(known["sha256"])
    started = time.time()
    value = _read_hash(files)
    if all(stat[1] < (started - RACY_S) * 1e9 for stat in stats.values()):
        entries = _load(memo)  # another build may have added its checkpoint meanwhile
        entries[name] = {"files": stats, "sha256": value}
        _save(memo, entries)
    log.info("hashed checkpoint %s in %.1f s", checkpoint, time.time() - started)
    return value
