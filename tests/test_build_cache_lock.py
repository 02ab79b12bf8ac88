"""The engine cache shared by pods (serving/artifacts/cache_lock.py): real processes race on one cache folder, as pods
starting together on a ReadWriteMany volume do. No TensorRT here: stand-in build functions write the "engines"
(slowly, so that the races are real) and log every build to a file, which counts them across processes."""

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

from serving.artifacts import engines
from serving.artifacts.cache_lock import CacheLockTimeoutError, build_once, exclusive_lock
from tests.test_build_engines import SPEC

CTX = multiprocessing.get_context("fork")  # the children inherit the test's stand-ins
ENGINE = b"half-engine"


def slow_build(builds: Path, delay: float = 0.5) -> Callable[[Path], None]:
    def build(partial: Path) -> None:
        with builds.open("a") as log:
            log.write(f"{os.getpid()}\n")
        partial.write_bytes(b"half")
        time.sleep(delay)
        with partial.open("ab") as out:
            out.write(b"-engine")

    return build


def build_and_report(target: Path, builds: Path, results: Any, start: Any = None) -> None:
    if start is not None:
        start.wait()
    built = build_once(target, slow_build(builds), timeout_s=60)
    results.put((built, target.read_bytes()))


def hang_mid_build(target: Path, writing: Any) -> None:
    def build(partial: Path) -> None:
        partial.write_bytes(b"half")
        writing.set()
        time.sleep(600)

    build_once(target, build, timeout_s=60)


def test_racing_processes_build_once_and_share_the_file(tmp_path: Path) -> None:
    target, builds = tmp_path / "transformer.plan", tmp_path / "builds.log"
    start, results = CTX.Barrier(3), CTX.Queue()
    racers = [CTX.Process(target=build_and_report, args=(target, builds, results, start)) for _ in range(3)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=60) for _ in racers]
    for racer in racers:
        racer.join(10)
        assert racer.exitcode == 0
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
    waiter = CTX.Process(target=build_and_report, args=(target, builds, results))
    waiter.start()
    time.sleep(1.5)  # the waiter polls the lock meanwhile
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
        with pytest.raises(CacheLockTimeoutError, match=r"another builder held .*transformer\.plan\.lock for over 2 s"):
            build_once(target, lambda partial: pytest.fail("built without the lock"), timeout_s=2)
        assert 2 <= time.monotonic() - started < 10
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
    start, results = CTX.Barrier(2), CTX.Queue()
    pods = [CTX.Process(target=build_engines_and_report, args=(onnx, cache, results, start)) for _ in range(2)]
    for pod in pods:
        pod.start()
    (folder,) = {results.get(timeout=60) for _ in pods}
    for pod in pods:
        pod.join(10)
        assert pod.exitcode == 0
    assert sorted(builds.read_text().splitlines()) == ["transformer", "vae_decoder", "vae_encoder"]
    target = Path(folder)
    assert (target / "transformer.plan").read_bytes() == b"transformer bf16"
    assert json.loads((target / "engines.json").read_text())["gpu"] == "Stand-in GPU"
    assert not list(target.glob("*.partial")) and not list(target.glob(".engines.json.*"))
