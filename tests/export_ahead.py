"""The test session's ONNX export of the golden checkpoint, run in a child process from the session's start
(tests/conftest.py) while the tests that do not need it go first: it takes one core for about a minute, which those
tests mostly leave idle. It runs with one torch thread, and at a low priority (set by the session) so that it takes
no time from them until a test needs the export (the fixtures then raise it back to theirs).

The fixtures that need the export call `cached_export` as before: it waits for this process's lock on the folder and
then finds the graphs in place. Should this process fail or be killed, they export the graphs themselves (and a
broken export fails there, in the test that needs it).

    python -m tests.export_ahead CHECKPOINT CACHE_ROOT [--whole]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from serving.artifacts.onnx_export import cached_export
from serving.runtime.onnx_backend import COMPONENT_GRAPHS, GRAPH_NAMES
from serving.runtime.onnx_stages import TRANSFORMER_STAGES

# What ONNX Runtime runs (OnnxBackend: the components and the transformer's stages); `--whole` adds the whole
# transformer (TensorRT's graph), a third of the export's time, for a session with tests that read it.
SERVED_GRAPHS = (*COMPONENT_GRAPHS, *TRANSFORMER_STAGES)


def main(argv: list[str]) -> None:
    checkpoint, cache_root, *rest = argv
    torch.set_num_threads(1)
    cached_export(Path(checkpoint), Path(cache_root), graphs=SERVED_GRAPHS)
    if rest == ["--whole"]:
        cached_export(Path(checkpoint), Path(cache_root), graphs=GRAPH_NAMES)


if __name__ == "__main__":
    main(sys.argv[1:])
