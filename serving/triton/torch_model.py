"""Triton Python-backend model that runs one component graph in PyTorch, in float32 or bfloat16.

The `pytorch` repository backend: the same modules the ONNX graphs are exported from (serving/model/graphs.py),
loaded from the checkpoint part linked into the version folder. In bfloat16 the weights are bf16, as the
reference pipeline runs; on CPUs with AMX or AVX512-BF16 that is faster than float32 and, unlike float32, gains
from batch (benchmarks/README.md): the CPU counterpart of serving bf16 engines on a GPU. Inputs and outputs keep
the float32 tensor contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from serving.model.checkpoint import load_graph
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.step_cache import CacheStore, controls_of
from serving.runtime.torch_backend import run_graph, transformer_call
from serving.runtime.torch_stages import TorchStages
from serving.triton.component_model import ComponentModel
from serving.triton.tensors import from_triton, instance_placement, to_triton


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        # Inputs and outputs stay float32 CPU tensors whatever the device (run_graph moves them).
        device, dtype = instance_placement(args, self.params["precision"])
        self.graph = load_graph(args["model_name"], self.version_dir, dtype, device)
        # The transformer keeps the step-cache state of the requests in flight (serving/pipeline/step_cache.py).
        self.stages = TorchStages(self.graph) if isinstance(self.graph, OmniGen2Transformer) else None
        self.step_cache = CacheStore()
        threads = int(self.params.get("intra_op_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)

    def to_array(self, tensor: Any) -> np.ndarray:
        return from_triton(tensor).numpy()

    def to_tensor(self, name: str, value: np.ndarray) -> Any:
        return to_triton(name, value)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.stages is None:
            return [run_graph(self.graph, **{name: torch.from_numpy(value) for name, value in feed.items()}).numpy()]
        controls = controls_of(feed)
        inputs = {name: torch.from_numpy(value) for name, value in feed.items()}
        velocity, _ = transformer_call(self.stages, inputs, controls, self.step_cache)
        return [velocity.numpy()]
