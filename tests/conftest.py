"""Shared fixtures: the golden data (read-only) and models loaded once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.artifacts.onnx_export import cached_export
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.eager import OmniGen2Pipeline
from serving.runtime.onnx_backend import COMPONENT_GRAPHS, GRAPH_NAMES
from serving.runtime.onnx_stages import TRANSFORMER_STAGES

REPO = Path(__file__).resolve().parents[1]


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
    checkpoint and the export settings, not by the graph code: after changing serving/model/, empty the folder."""
    kept = os.environ.get("OMNIGEN2_ONNX_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def tiny_onnx(onnx_cache: Path, tiny_checkpoint: Path) -> Path:
    """The graphs ONNX Runtime runs (OnnxBackend: the components and the transformer's stages), which the
    `onnxruntime` repository is made from too."""
    return cached_export(tiny_checkpoint, onnx_cache, graphs=(*COMPONENT_GRAPHS, *TRANSFORMER_STAGES))


@pytest.fixture(scope="session")
def tiny_onnx_whole(tiny_onnx: Path, tiny_checkpoint: Path) -> Path:
    """The same export with the whole transformer added (TensorRT's graph; a third of the export's time, so only the
    tests that read it pay for it)."""
    return cached_export(tiny_checkpoint, tiny_onnx.parent, graphs=GRAPH_NAMES)


@pytest.fixture(scope="session")
def golden_transformer(tiny_checkpoint: Path) -> OmniGen2Transformer:
    return OmniGen2Transformer.from_pretrained(tiny_checkpoint / "transformer")


@pytest.fixture(scope="session")
def golden_pipeline(tiny_checkpoint: Path) -> OmniGen2Pipeline:
    return OmniGen2Pipeline.from_pretrained(tiny_checkpoint)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where torch sees CUDA (the device machine); elsewhere they are skipped, and counted."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "needs a CUDA device" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} gpu tests not run: no CUDA device here (CI has none)")
