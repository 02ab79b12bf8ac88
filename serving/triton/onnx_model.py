"""Triton Python-backend model that runs one exported ONNX graph with ONNX Runtime.

The embedded CPU Triton (the `tritonserver` from the nvidia-pytriton wheel) has only the Python backend, so
each component is this model around an ONNX Runtime session. Only numpy and onnxruntime are imported: every
Python-backend instance is its own process, and importing torch would add its whole runtime to each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from serving.triton.component_model import ComponentModel


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(self.params.get("intra_op_threads", "0"))
        # ONNX Runtime's arena never shrinks: after a large call the process would keep its peak for good.
        options.enable_cpu_mem_arena = False
        path = self.version_dir / self.params["onnx_file"]
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs: list[np.ndarray] = self.session.run(self.output_names, feed)
        return outputs
