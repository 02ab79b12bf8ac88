"""Shared fixtures: the golden data (read-only) and models loaded once per session."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.artifacts.onnx_export import cached_export
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.eager import OmniGen2Pipeline
from serving.runtime.onnx_backend import GRAPH_NAMES
from tests.export_ahead import SERVED_GRAPHS

REPO = Path(__file__).resolve().parents[1]
# Whether the collected tests need the session's ONNX export: None (no), False (the served graphs), True (and the
# whole transformer). Set at collection, read by `export_ahead`.
EXPORT_AHEAD = pytest.StashKey[bool | None]()


@pytest.fixture(scope="session")
def golden() -> Path:
    path = Path(os.environ.get("OMNIGEN2_GOLDEN", REPO.parent / "shared" / "golden")).resolve()
    if not (path / "cases.json").is_file():
        raise RuntimeError(f"golden data not found at {path}: set OMNIGEN2_GOLDEN to ../shared/golden")
    return path


@pytest.fixture(scope="session")
def cases(golden: Path) -> dict[str, Any]:
    return json.loads((golden / "cases.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(golden: Path) -> Path:
    return golden / "tiny-omnigen2"


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export folder of the golden checkpoint per test session (graphs added as tests ask), or one kept
    between sessions in OMNIGEN2_ONNX_CACHE (a developer's folder, for quick reruns). The export is keyed by the
    checkpoint and the export settings, not by the graph code: after changing serving/model/, empty the folder.

    Under pytest-xdist (`make unit PYTEST_WORKERS=2`) the folder is the run's, beside the workers' own temporary
    folders: each worker's background export and `tiny_onnx` go through the export's lock on it, so the first one
    exports and the others wait and reuse that export, instead of each worker exporting the checkpoint again."""
    kept = os.environ.get("OMNIGEN2_ONNX_CACHE")
    if kept:
        return Path(kept)
    if "PYTEST_XDIST_WORKER" in os.environ:  # set in each worker's process by xdist
        shared = tmp_path_factory.getbasetemp().parent / "onnx-cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def tiny_onnx(onnx_cache: Path, tiny_checkpoint: Path, export_ahead: subprocess.Popen[bytes] | None) -> Path:
    """The graphs ONNX Runtime runs (OnnxBackend: the components and the transformer's stages), which the
    `onnxruntime` repository is made from too."""
    _hurry(export_ahead)
    return cached_export(tiny_checkpoint, onnx_cache, graphs=SERVED_GRAPHS)


@pytest.fixture(scope="session")
def tiny_onnx_whole(tiny_onnx: Path, tiny_checkpoint: Path, export_ahead: subprocess.Popen[bytes] | None) -> Path:
    """The same export with the whole transformer added (TensorRT's graph; a third of the export's time, so only the
    tests that read it pay for it)."""
    _hurry(export_ahead)
    return cached_export(tiny_checkpoint, tiny_onnx.parent, graphs=GRAPH_NAMES)


def _hurry(export: subprocess.Popen[bytes] | None) -> None:
    """A test now waits for the background export: it runs at the tests' priority from here (where allowed)."""
    if export is not None and export.poll() is None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, export.pid, os.getpriority(os.PRIO_PROCESS, 0))


@pytest.fixture(scope="session", autouse=True)
def export_ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes] | None]:
    """The ONNX export `tiny_onnx` waits for, started in the background as the session begins (tests/export_ahead.py;
    the modules that need it run last). Stopped at the session's end if still running."""
    whole = request.config.stash.get(EXPORT_AHEAD, None)
    if whole is None:
        yield None
        return
    try:
        cache, checkpoint = request.getfixturevalue("onnx_cache"), request.getfixturevalue("tiny_checkpoint")
    except RuntimeError:  # no golden data: the tests that need it fail on it themselves, not every test
        yield None
        return
    command = [sys.executable, "-m", "tests.export_ahead", str(checkpoint), str(cache), *(["--whole"] if whole else [])]
    with (tmp_path_factory.mktemp("export-ahead") / "export.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    with contextlib.suppress(OSError):  # it may have ended already
        os.setpriority(os.PRIO_PROCESS, process.pid, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


@pytest.fixture(scope="session")
def golden_transformer(tiny_checkpoint: Path) -> OmniGen2Transformer:
    return OmniGen2Transformer.from_pretrained(tiny_checkpoint / "transformer")


@pytest.fixture(scope="session")
def golden_pipeline(tiny_checkpoint: Path) -> OmniGen2Pipeline:
    return OmniGen2Pipeline.from_pretrained(tiny_checkpoint)


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect: the export is for the tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with tests that need the ONNX export run after the others, so that the export made in the background
    (`export_ahead`) overlaps those. With pytest-xdist workers this order is the one the files are handed out in
    (`--dist=loadfile --no-loadscope-reorder`, pyproject.toml: every worker collects, and sorts, the same way). `gpu`
    tests run where torch sees CUDA (the device machine); elsewhere they are skipped, and counted."""
    late = {item.path for item in items if _uses(item, "tiny_onnx")}
    items.sort(key=lambda item: item.path in late)  # stable: each module keeps its place in its group
    if late:
        config.stash[EXPORT_AHEAD] = any(_uses(item, "tiny_onnx_whole") for item in items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _uses(item: pytest.Item, fixture: str) -> bool:
    """Whether a test asks for `fixture`, directly or through its other fixtures."""
    return fixture in getattr(item, "fixturenames", ())


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "needs a CUDA device" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} gpu tests not run: no CUDA device here (CI has none)")
