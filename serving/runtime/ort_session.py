"""ONNX Runtime session settings, one place for every session the project opens (served components, the eager
ONNX pipeline, ablations). Imports no torch: an ONNX Runtime component process must not pay for it."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Full graph optimisation; `threads` = 0 lets ONNX Runtime use every core. The CPU arena is off: it never
    shrinks, so after one large call a process would keep its peak for good."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False
    return options


def cpu_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
