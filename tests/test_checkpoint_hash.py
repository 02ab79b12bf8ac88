"""The checkpoint hash and its memo: the same value as a plain read, no re-read of unchanged files, and every
rewrite seen."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from serving.artifacts import checkpoint_hash as hashing
from serving.artifacts.checkpoint_hash import HASH_MEMO, checkpoint_hash

# The golden checkpoint's hash before the memo existed: exports, engines and repositories keyed by it stay valid.
TINY_SHA256 = "df5447fe859f68601f82a299e677d69aef9f221141d9f895f7cf6b4529ba1d2c"
OLD_NS = 1_700_000_000 * 10**9  # a settled mtime, well before RACY_S


def _checkpoint(root: Path) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    (root / "transformer" / "weights.bin").write_bytes(b"\x01" * 4096)
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(OLD_NS, OLD_NS))
    return root


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the hash opens, in order."""
    opened: list[Path] = []
    real = hashing._read_hash

    def counting(files: list[tuple[str, Path, list[int]]]) -> str:
        opened.extend(path for _, path, _ in files)
        return real(files)

    monkeypatch.setattr(hashing, "_read_hash", counting)
    return opened


def test_the_golden_checkpoint_keeps_its_hash(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert checkpoint_hash(tiny_checkpoint) == TINY_SHA256
    assert checkpoint_hash(tiny_checkpoint, tmp_path) == TINY_SHA256  # read, memoised
    assert checkpoint_hash(tiny_checkpoint, tmp_path) == TINY_SHA256  # from the memo
    assert str(tiny_checkpoint.resolve()) in json.loads((tmp_path / HASH_MEMO).read_text())


def test_an_unchanged_checkpoint_is_not_read_again(tmp_path: Path, reads: list[Path]) -> None:
    checkpoint, cache = _checkpoint(tmp_path / "ckpt"), tmp_path / "cache"
    first = checkpoint_hash(checkpoint, cache)
    assert len(reads) == 2
    assert checkpoint_hash(checkpoint, cache) == first
    assert len(reads) == 2  # every file's (size, mtime_ns, inode) matched: nothing opened
    assert checkpoint_hash(checkpoint) == first  # without a memo: a plain read, the same value
    assert len(reads) == 4


def test_a_rewritten_file_is_read_again(tmp_path: Path, reads: list[Path]) -> None:
    checkpoint, cache = _checkpoint(tmp_path / "ckpt"), tmp_path / "cache"
    first = checkpoint_hash(checkpoint, cache)
    weights = checkpoint / "transformer" / "weights.bin"
    weights.write_bytes(b"\x02" * 4096)  # same size, in place: only mtime_ns tells
    os.utime(weights, ns=(OLD_NS + 1, OLD_NS + 1))
    second = checkpoint_hash(checkpoint, cache)
    assert second != first
    assert len(reads) == 4
    replaced = weights.with_name("new.bin")
    replaced.write_bytes(b"\x01" * 4096)  # the old bytes again, through a new inode (as a download or sync does)
    os.utime(replaced, ns=(OLD_NS + 1, OLD_NS + 1))
    replaced.replace(weights)
    assert checkpoint_hash(checkpoint, cache) == first
    assert len(reads) == 6


def test_added_and_removed_files_change_the_hash(tmp_path: Path) -> None:
    checkpoint, cache = _checkpoint(tmp_path / "ckpt"), tmp_path / "cache"
    first = checkpoint_hash(checkpoint, cache)
    extra = checkpoint / "transformer" / "extra.json"
    extra.write_text("{}")
    assert checkpoint_hash(checkpoint, cache) != first
    extra.unlink()
    assert checkpoint_hash(checkpoint, cache) == first


def test_files_written_just_now_are_not_memoised(tmp_path: Path, reads: list[Path]) -> None:
    """A second write in the same clock tick could keep mtime_ns: a fresh file is hashed again until it settles."""
    checkpoint, cache = _checkpoint(tmp_path / "ckpt"), tmp_path / "cache"
    (checkpoint / "model_index.json").write_text("{}")  # mtime: now
    checkpoint_hash(checkpoint, cache)
    assert not (cache / HASH_MEMO).exists()
    checkpoint_hash(checkpoint, cache)
    assert len(reads) == 4


def test_a_broken_or_read_only_memo_costs_a_read_not_the_build(tmp_path: Path, reads: list[Path]) -> None:
    checkpoint, cache = _checkpoint(tmp_path / "ckpt"), tmp_path / "cache"
    cache.mkdir()
    (cache / HASH_MEMO).write_text("{half")
    value = checkpoint_hash(checkpoint, cache)
    assert checkpoint_hash(checkpoint, cache) == value  # the broken memo was replaced
    assert len(reads) == 2
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    assert checkpoint_hash(checkpoint, blocked) == value  # the memo cannot be written there


def test_a_repository_build_reads_the_checkpoint_once_then_never(
    tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path, reads: list[Path]
) -> None:
    """The ONNX Runtime build used to hash it three times (repository, cached_export, export_onnx)."""
    from serving.artifacts.repository import prepare_repository

    cache = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, cache / tiny_onnx.name)  # the export, without its cache's memo
    files = len([p for p in tiny_checkpoint.rglob("*") if p.is_file()])
    prepare_repository(tiny_checkpoint, tmp_path / "first", onnx_cache=cache)
    assert len(reads) == files
    prepare_repository(tiny_checkpoint, tmp_path / "second", onnx_cache=cache)
    assert len(reads) == files
    assert json.loads((tmp_path / "second" / "repository.json").read_text())["checkpoint_sha256"] == TINY_SHA256
