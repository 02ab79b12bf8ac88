"""Triton Python-backend model that runs one exported ONNX graph with ONNX Runtime.

The embedded CPU Triton (the `tritonserver` from the nvidia-pytriton wheel) has only the Python backend, so
each component is this model around an ONNX Runtime session. Requests that Triton's dynamic batcher hands over
together are grouped by shape and each group runs as one session call. Only numpy and onnxruntime are imported:
every Python-backend instance is its own process, and torch would cost it about 250 MB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params["onnx_file"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names} for r in requests]
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, feed in enumerate(feeds):
            key = tuple((name, feed[name].shape[1:] if self.batched else feed[name].shape) for name in self.input_names)
            groups.setdefault(key, []).append(index)
        for members in groups.values():
            try:
                outputs = self._run([feeds[i] for i in members])
                for i, result in zip(members, outputs, strict=True):
                    tensors = [
                        pb_utils.Tensor(name, value) for name, value in zip(self.output_names, result, strict=True)
                    ]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:  # report to the caller instead of killing the model instance
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                    )
        return responses

    def _run(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """One session call for same-shaped requests; split the outputs back along the batch axis."""
        if len(feeds) == 1 or not self.batched:
            return [self.session.run(self.output_names, feed) for feed in feeds]
        merged = {name: np.concatenate([f[name] for f in feeds]) for name in self.input_names}
        outputs = self.session.run(self.output_names, merged)
        bounds = np.cumsum([len(f[self.input_names[0]]) for f in feeds])[:-1]
        per_output = [np.split(out, bounds) for out in outputs]
        return [[chunks[i] for chunks in per_output] for i in range(len(feeds))]
