"""Triton Python-backend model that runs one exported ONNX graph with ONNX Runtime.

The embedded CPU Triton (the `tritonserver` from the nvidia-pytriton wheel) has only the Python backend, so
each component is this model around an ONNX Runtime session. Only numpy and onnxruntime are imported: every
Python-backend instance is its own process, and importing torch would add its whole runtime to each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.runtime.ort_session import cpu_session
from serving.triton.component_model import ComponentModel


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        path = self.version_dir / self.params["onnx_file"]
        self.session = cpu_session(path, int(self.params.get("intra_op_threads", "0")))

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs: list[np.ndarray] = self.session.run(self.output_names, feed)
        return outputs
