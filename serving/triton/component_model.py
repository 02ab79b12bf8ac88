"""What every Python-backend component model shares: batched execution over one tensor contract.

Requests that Triton's dynamic batcher hands over together are grouped by shape and each group runs as one
call of the runtime (`run`), whose outputs are split back along the batch axis. Subclasses only load and run
their graph. Only numpy is imported here: an ONNX Runtime component must not pay for torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.triton.cpu_lane import CpuLane
from serving.triton.log import route_to_triton
from serving.triton.memory import IdleTrimmer, use_stub_mmap_threshold
from serving.triton.model_config import model_config, parameters

log = logging.getLogger(__name__)


class ComponentModel:
    def initialize(self, args: dict[str, str]) -> None:
        route_to_triton()
        use_stub_mmap_threshold()
        config = model_config(args)
        self.params = parameters(config)
        model_dir = Path(args["model_repository"])
        self.version_dir = model_dir / args["model_version"]
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.lane = CpuLane.for_model(model_dir, self.params)
        self.trimmer = IdleTrimmer()

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph on one batch: inputs by name, outputs in `output_names` order."""
        raise NotImplementedError

    def _run_in_lane(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self.lane:
            return self.run(feed)

    def execute(self, requests: list[Any]) -> list[Any]:
        with self.trimmer:
            return self._execute(requests)

    def to_array(self, tensor: Any) -> np.ndarray:
        """A request's input as an array. Through numpy here (ONNX Runtime components import no torch); the
        PyTorch components override both conversions with DLPack, which numpy 2 does not silently empty."""
        array: np.ndarray = tensor.as_numpy()
        return array

    def to_tensor(self, name: str, value: np.ndarray) -> Any:
        return pb_utils.Tensor(name, value)

    def _execute(self, requests: list[Any]) -> list[Any]:
        feeds = [self._feed(r) for r in requests]
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, feed in enumerate(feeds):
            key = tuple((name, value.shape[1:] if self.batched else value.shape) for name, value in feed.items())
            groups.setdefault(key, []).append(index)
        for members in groups.values():
            try:
                outputs = self._run_group([feeds[i] for i in members])
                for i, result in zip(members, outputs, strict=True):
                    tensors = [
                        self.to_tensor(name, value) for name, value in zip(self.output_names, result, strict=True)
                    ]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:  # report to the caller instead of killing the model instance
                log.exception("a call of %d requests failed", len(members))
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                    )
        return responses

    def _feed(self, request: Any) -> dict[str, np.ndarray]:
        """A request's inputs by name; optional ones it left out are absent."""
        tensors = {n: pb_utils.get_input_tensor_by_name(request, n) for n in self.input_names}
        return {n: self.to_array(t) for n, t in tensors.items() if t is not None}

    def _run_group(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """One runtime call for same-shaped requests; split the outputs back along the batch axis."""
        if len(feeds) == 1 or not self.batched:
            return [self._run_in_lane(feed) for feed in feeds]
        merged = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
        outputs = self._run_in_lane(merged)
        bounds = np.cumsum([len(f[self.input_names[0]]) for f in feeds])[:-1]
        per_output = [np.split(out, bounds) for out in outputs]
        return [[chunks[i] for chunks in per_output] for i in range(len(feeds))]
