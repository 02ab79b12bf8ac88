"""The engine and ONNX caches shared by pods (serving/artifacts/cache_lock.py): real processes race on one cache
folder, as pods starting together on a ReadWriteMany volume do. No TensorRT here, and no real export: stand-in build
functions write the "engines" and "graphs" (slowly, so that the races are real) and log every build to a file, which
counts them across processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from serving.artifacts import engines, onnx_export
from serving.artifacts.cache_lock import CacheLockTimeoutError, build_once, exclusive_lock
from serving.runtime.onnx_backend import read_manifest
from tests.test_build_engines import SPEC

CTX = multiprocessing.get_context("fork")  # the children inherit the test's stand-ins
ENGINE = b"half-engine"


def race(work: Callable[..., None], calls: list[tuple[Any, ...]], timeout_s: float) -> list[Any]:
    """Runs `work(*args, results, start)` for each args in a process of its own, released together at a barrier;
    returns what each put on `results`, once every process has exited with 0."""
    start, results = CTX.Barrier(len(calls)), CTX.Queue()
    racers = [CTX.Process(target=work, args=(*args, results, start)) for args in calls]
    for racer in racers:
        racer.start()
    reports = [results.get(timeout=timeout_s) for _ in racers]
    for racer in racers:
        racer.join(10)
        assert racer.exitcode == 0
    return reports


def write_slowly(path: Path, builds: Path, entry: str, rest: bytes, delay: float) -> None:
    """A slow build's output: `entry` logged to `builds`, then `path` written in two steps `delay` apart."""
    with builds.open("a") as log:
        log.write(f"{entry}\n")
    path.write_bytes(b"half")
    time.sleep(delay)
    with path.open("ab") as out:
        out.write(rest)


def slow_build(builds: Path, delay: float = 0.5) -> Callable[[Path], None]:
    def build(partial: Path) -> None:
        write_slowly(partial, builds, str(os.getpid()), b"-engine", delay)

    return build


def build_and_report(target: Path, builds: Path, results: Any, start: Any = None) -> None:
    if start is not None:
        start.wait()
    built = build_once(target, slow_build(builds), timeout_s=60)
    results.put((built, target.read_bytes()))


class Waiting(logging.Handler):
    """Sets `event` once the cache lock logs that another builder holds it: this process has tried it and waits."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "another builder holds" in record.getMessage():
            self.event.set()


def waiting_then(waiting: Any, work: Callable[..., None], *args: Any) -> None:
    """`work(*args)` in a child that sets `waiting` when it finds the lock held."""
    lock_log = logging.getLogger("export.cache_lock")
    lock_log.setLevel(logging.INFO)
    lock_log.addHandler(Waiting(waiting))
    work(*args)


def hang_mid_build(target: Path, writing: Any) -> None:
    def build(partial: Path) -> None:
        partial.write_bytes(b"half")
        writing.set()
        time.sleep(600)

    build_once(target, build, timeout_s=60)


def test_racing_processes_build_once_and_share_the_file(tmp_path: Path) -> None:
    target, builds = tmp_path / "transformer.plan", tmp_path / "builds.log"
    outcomes = race(build_and_report, [(target, builds)] * 3, timeout_s=60)
    assert len(builds.read_text().splitlines()) == 1
    assert sorted(built for built, _ in outcomes) == [False, False, True]
    assert {data for _, data in outcomes} == {ENGINE}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds.log", "transformer.plan", "transformer.plan.lock"]


def test_a_builder_killed_mid_build_frees_the_waiter_which_builds_again(tmp_path: Path) -> None:
    """The dying builder's half-written file is never served: the waiter takes the lock the kernel released,
    finds no engine and builds its own over the leftover."""
    target, builds = tmp_path / "transformer.plan", tmp_path / "builds.log"
    writing, results = CTX.Event(), CTX.Queue()
    dying = CTX.Process(target=hang_mid_build, args=(target, writing))
    dying.start()
    assert writing.wait(30)
    waiting = CTX.Event()
    waiter = CTX.Process(target=waiting_then, args=(waiting, build_and_report, target, builds, results))
    waiter.start()
    assert waiting.wait(30)  # it tried the lock and polls it
    assert waiter.is_alive() and results.empty() and not target.exists()
    (leftover,) = tmp_path.glob("transformer.plan.partial.*")  # the dying builder's own aside name
    assert leftover.read_bytes() == b"half" and leftover.name.endswith(f".{dying.pid}")
    assert dying.pid is not None
    os.kill(dying.pid, signal.SIGKILL)
    dying.join(10)
    assert results.get(timeout=30) == (True, ENGINE)
    waiter.join(10)
    assert waiter.exitcode == 0
    assert len(builds.read_text().splitlines()) == 1
    assert not list(tmp_path.glob("transformer.plan.partial.*"))


def test_a_hung_builder_bounds_the_wait(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A holder that neither finishes nor dies (here: this process, holding the lock through its own descriptor):
    the waiter says what it waits for, then gives up with an error instead of waiting forever."""
    caplog.set_level(logging.INFO, logger="export.cache_lock")
    target = tmp_path / "transformer.plan"
    with exclusive_lock(tmp_path / "transformer.plan.lock", 1, "holder"):
        started = time.monotonic()
        with pytest.raises(CacheLockTimeoutError, match=r"another builder held .*transformer\.plan\.lock for over 1 s"):
            build_once(target, lambda partial: pytest.fail("built without the lock"), timeout_s=1)
        assert 1 <= time.monotonic() - started < 10
    assert "transformer.plan: another builder holds" in caplog.text and "waiting for it" in caplog.text
    assert not target.exists()


def test_a_failed_build_leaves_no_file_and_the_next_one_builds(tmp_path: Path) -> None:
    target = tmp_path / "transformer.plan"

    def broken(partial: Path) -> None:
        partial.write_bytes(b"half")
        raise RuntimeError("TensorRT engine build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        build_once(target, broken, timeout_s=5)
    assert [p.name for p in tmp_path.iterdir()] == ["transformer.plan.lock"]
    assert build_once(target, lambda partial: partial.write_bytes(ENGINE), timeout_s=5)
    assert not build_once(target, lambda partial: pytest.fail("rebuilt a cached engine"), timeout_s=5)
    assert target.read_bytes() == ENGINE


def build_engines_and_report(onnx: Path, cache: Path, results: Any, start: Any) -> None:
    start.wait()
    results.put(str(engines.build_engines(onnx, cache, "bf16", engines.ProfileBounds.from_limits(), wait_s=60)))


def test_pods_sharing_the_engine_cache_build_each_engine_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """build_engines in two processes against one empty cache, with the cache key as it is: each engine is built
    once, and both get the same folder. TensorRT, the GPU and the engine build are stand-ins."""
    onnx, cache, builds = tmp_path / "onnx", tmp_path / "engines", tmp_path / "builds.log"
    onnx.mkdir()
    graphs: dict[str, Any] = {name: {"file": f"{name}.onnx"} for name in ("transformer", "vae_encoder", "vae_decoder")}
    graphs["text_encoder"] = {"outputs": [{"name": "text_feats", "shape": ["batch", "text", 2048]}]}
    manifest = {"checkpoint_sha256": "abc", "settings": {"format_version": 3}, "spec": SPEC, "graphs": graphs}
    (onnx / "manifest.json").write_text(json.dumps(manifest))

    def stand_in(trt: Any, onnx_path: Path, plan: Path, precision: str, shapes: Any) -> None:
        with builds.open("a") as log:
            log.write(f"{onnx_path.stem}\n")
        time.sleep(0.3)
        plan.write_bytes(f"{onnx_path.stem} {precision}".encode())

    monkeypatch.setattr(engines, "require_tensorrt", lambda: SimpleNamespace(__version__="10.0-stand-in"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    monkeypatch.setattr(engines, "build_engine", stand_in)
    (folder,) = set(race(build_engines_and_report, [(onnx, cache)] * 2, timeout_s=60))
    assert sorted(builds.read_text().splitlines()) == ["transformer", "vae_decoder", "vae_encoder"]
    target = Path(folder)
    assert (target / "transformer.plan").read_bytes() == b"transformer bf16"
    assert json.loads((target / "engines.json").read_text())["gpu"] == "Stand-in GPU"
    assert not list(target.glob("*.partial")) and not list(target.glob(".engines.json.*"))


def stand_in_export(builds: Path, delay: float = 0.5) -> Callable[..., dict[str, Any]]:
    """export_graph's stand-in: a graph file written in two steps, slowly, each export logged to `builds`."""

    def export(name: str, modules: Any, path: Path, opset: int, slim: bool) -> dict[str, Any]:
        write_slowly(path, builds, name, b"-graph", delay)
        return {"file": path.name, "inputs": [], "outputs": []}

    return export


def export_and_report(checkpoint: Path, out: Path, graphs: tuple[str, ...], results: Any, start: Any = None) -> None:
    if start is not None:
        start.wait()
    onnx_export.export_onnx(checkpoint, out, key="abc", graphs=graphs, wait_s=60)
    results.put((graphs, sorted(read_manifest(out)["graphs"])))


def test_pods_sharing_the_onnx_cache_export_each_graph_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Three processes ask one empty export folder for graphs: two for the same ones, one for one more. Each graph
    is exported once, by whichever holds the lock when it is missing, and every process finds what it asked for."""
    out, builds = tmp_path / "onnx" / "abc", tmp_path / "builds.log"
    monkeypatch.setattr(onnx_export, "export_graph", stand_in_export(builds))
    asks = [("vae_encoder", "vae_decoder"), ("vae_encoder", "vae_decoder"), ("vae_encoder", "transformer")]
    found = race(export_and_report, [(tiny_checkpoint, out, ask) for ask in asks], timeout_s=120)
    assert all(set(asked) <= set(held) for asked, held in found)
    assert sorted(builds.read_text().splitlines()) == ["transformer", "vae_decoder", "vae_encoder"]
    manifest = read_manifest(out)
    assert list(manifest["graphs"]) == ["vae_encoder", "vae_decoder", "transformer"]  # GRAPH_NAMES' order
    assert {p.name: p.read_bytes() for p in out.glob("*.onnx")} == {
        f"{name}.onnx": b"half-graph" for name in manifest["graphs"]
    }
    assert (out / "processor").is_dir()
    assert sorted(p.name for p in out.parent.iterdir()) == ["abc", "abc.lock"]


def export_hanging(checkpoint: Path, out: Path, writing: Any) -> None:
    def export(name: str, modules: Any, path: Path, opset: int, slim: bool) -> dict[str, Any]:
        path.write_bytes(b"half")
        writing.set()
        time.sleep(600)
        raise AssertionError("not reached")

    onnx_export.export_graph = export  # this child's own module
    onnx_export.export_onnx(checkpoint, out, key="abc", graphs=("vae_decoder",), wait_s=60)


def test_an_exporter_killed_mid_export_frees_the_waiter_which_exports_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Readers never see the dying exporter's folder: it is written aside, under its own name, and the waiter that
    takes the lock removes it and exports whole."""
    out, builds = tmp_path / "abc", tmp_path / "builds.log"
    monkeypatch.setattr(onnx_export, "export_graph", stand_in_export(builds))
    writing, results = CTX.Event(), CTX.Queue()
    dying = CTX.Process(target=export_hanging, args=(tiny_checkpoint, out, writing))
    dying.start()
    assert writing.wait(60)
    waiting = CTX.Event()
    args = (waiting, export_and_report, tiny_checkpoint, out, ("vae_decoder",), results)
    waiter = CTX.Process(target=waiting_then, args=args)
    waiter.start()
    assert waiting.wait(60)  # it tried the lock and polls it
    assert waiter.is_alive() and results.empty() and not out.exists()
    (leftover,) = tmp_path.glob("abc.partial.*")
    assert leftover.name.endswith(f".{dying.pid}") and (leftover / "vae_decoder.onnx").read_bytes() == b"half"
    assert dying.pid is not None
    os.kill(dying.pid, signal.SIGKILL)
    dying.join(10)
    assert results.get(timeout=60) == (("vae_decoder",), ["vae_decoder"])
    waiter.join(10)
    assert waiter.exitcode == 0
    assert builds.read_text().splitlines() == ["vae_decoder"]
    assert (out / "vae_decoder.onnx").read_bytes() == b"half-graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc", "abc.lock", "builds.log"]


def test_a_hung_exporter_bounds_the_wait(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "abc"
    held = exclusive_lock(tmp_path / "abc.lock", 1, "holder")  # as a live exporter that never finishes would
    with held, pytest.raises(CacheLockTimeoutError, match=r"ONNX export abc: another builder held .*abc\.lock"):
        onnx_export.export_onnx(tiny_checkpoint, out, key="abc", graphs=("vae_decoder",), wait_s=1)
    assert not out.exists()


def test_an_export_replaces_another_checkpoints_export_but_never_other_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A fixed --out holding another checkpoint's export gets the new one whole (no graph of the old one stays); a
    folder that is no export is refused, untouched."""
    monkeypatch.setattr(onnx_export, "export_graph", stand_in_export(tmp_path / "builds.log", delay=0))
    out = tmp_path / "abc"
    onnx_export.export_onnx(tiny_checkpoint, out, key="abc", graphs=("vae_decoder",))
    onnx_export.export_onnx(tiny_checkpoint, out, key="abd", graphs=("vae_encoder",))
    assert read_manifest(out)["checkpoint_sha256"] == "abd"
    assert [p.name for p in out.glob("*.onnx")] == ["vae_encoder.onnx"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an export folder"):
        onnx_export.export_onnx(tiny_checkpoint, mine, key="abc", graphs=("vae_decoder",))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc", "abc.lock", "builds.log", "mine", "mine.lock"]
