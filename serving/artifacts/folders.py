"""Which folders a generated artifact may replace: builds write aside and then take the target's place whole."""

from __future__ import annotations

from pathlib import Path


def replaceable(out: Path, manifest: str, kept: tuple[str, ...] = ()) -> bool:
    """Whether a new build may take `out`'s place: it is missing, holds `manifest` (an earlier build of the same
    kind), or holds nothing but `kept` files; never a file or a folder of other files (a mistyped path, whose
    contents the build would delete)."""
    if not out.exists():
        return True
    return out.is_dir() and ((out / manifest).is_file() or all(p.name in kept for p in out.iterdir()))
