"""Triton Python-backend model `safety_classifier`: the NudeNet detector under ONNX Runtime, with this project's
pre- and post-processing (serving/safety/detections.py), batched across requests like the other components.

Tensor contract (docs/tensor_contract.md, the safety stage): letterboxed uint8 images and their original sizes
in; per-class image scores and the package's detections out. Another classifier with the same contract can take
this model's place. Only numpy and onnxruntime are imported (no torch in this process).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.runtime.ort_session import cpu_session
from serving.safety.detections import class_scores, decode, graph_input
from serving.triton.component_model import ComponentModel


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        self.session = cpu_session(self.version_dir / self.params["onnx_file"], int(self.params["intra_op_threads"]))
        self.graph_input_name = self.session.get_inputs()[0].name
        self.max_detections = int(self.params["max_detections"])
        self.detections_wanted = True

    def execute(self, requests: list[Any]) -> list[Any]:
        # Box decoding and suppression run in Python: only when a request of this batch asks for the detections (the
        # BLS asks for class_scores alone). Triton's Python backend drops the outputs a request did not ask for.
        self.detections_wanted = any("detections" in r.requested_output_names() for r in requests)
        return super().execute(requests)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        letterboxed, sizes = feed["image"], feed["image_size"]
        side = letterboxed.shape[1]
        (output,) = self.session.run(None, {self.graph_input_name: graph_input(letterboxed)})
        if not self.detections_wanted:  # a placeholder that splits along the batch axis; never sent
            return [class_scores(output), np.empty((len(output), 0, 6), dtype=np.float32)]
        found = [
            decode(out, int(h), int(w), side, self.max_detections) for out, (h, w) in zip(output, sizes, strict=True)
        ]
        return [class_scores(output), np.stack(found)]
