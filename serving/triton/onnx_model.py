"""Triton Python-backend model that runs one exported ONNX graph with ONNX Runtime.

The embedded CPU Triton (the `tritonserver` from the nvidia-pytriton wheel) has only the Python backend, so
each component is this model around an ONNX Runtime session. Only numpy and onnxruntime are imported: every
Python-backend instance is its own process, and importing torch would add its whole runtime to each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.pipeline.step_cache import CacheStore, cached_transformer, controls_of
from serving.runtime.onnx_stages import TRANSFORMER_STAGES, OnnxStages
from serving.runtime.ort_session import cpu_session
from serving.triton.component_model import ComponentModel
from serving.triton.model_names import TRANSFORMER


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        threads = int(self.params.get("intra_op_threads", "0"))
        # The transformer runs in stages and keeps the step-cache state of the requests in flight (step_cache.py).
        self.stages: OnnxStages | None = None
        self.step_cache: CacheStore[np.ndarray] = CacheStore()
        if args["model_name"] == TRANSFORMER:
            files = {name: self.version_dir / f"{name}.onnx" for name in TRANSFORMER_STAGES}
            self.stages = OnnxStages({name: cpu_session(path, threads) for name, path in files.items()})
        else:
            self.session = cpu_session(self.version_dir / self.params["onnx_file"], threads)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.stages is not None:
            velocity, _ = cached_transformer(self.stages, feed, controls_of(feed), self.step_cache)
            return [velocity]
        outputs: list[np.ndarray] = self.session.run(self.output_names, feed)
        return outputs
