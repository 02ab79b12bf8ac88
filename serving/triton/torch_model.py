"""Triton Python-backend model that runs one component graph in PyTorch, in float32 or bfloat16.

The `pytorch` repository backend: the same modules the ONNX graphs are exported from (serving/model/graphs.py),
loaded from the checkpoint part linked into the version folder. In bfloat16 the weights are bf16, as the
reference pipeline runs; on CPUs with AMX or AVX512-BF16 that is faster than float32 and, unlike float32, gains
from batch (benchmarks/README.md): the CPU counterpart of serving bf16 engines on a GPU. Inputs and outputs keep
the float32 tensor contract.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from serving.model.checkpoint import load_graph
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.step_cache import CacheStore, controls_of
from serving.runtime.fast_path import FastPath
from serving.runtime.torch_backend import run_graph, transformer_call
from serving.runtime.torch_stages import TorchStages, warm_up
from serving.triton.component_model import ComponentModel, log
from serving.triton.tensors import from_triton, instance_placement, to_triton


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        # Inputs and outputs stay float32 CPU tensors whatever the device (run_graph moves them).
        started = time.perf_counter()
        device, dtype = instance_placement(args, self.params["precision"])
        threads = int(self.params.get("intra_op_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.graph = load_graph(args["model_name"], self.version_dir, dtype, device)
        # The transformer keeps the step-cache state of the requests in flight (serving/pipeline/step_cache.py),
        # and takes the fast path its parameters name (compiled and warmed now, before the model is ready).
        self.stages = None
        if isinstance(self.graph, OmniGen2Transformer):
            fast = FastPath.from_params(self.params)
            self.stages = TorchStages(self.graph, fast)
            report = warm_up(self.stages)
            log.info(
                "%s on %s: loaded in %.1f s (fast path %s; warm-up %s)",
                args["model_name"],
                device,
                time.perf_counter() - started,
                fast.to_params(),
                report or "none",
            )
        self.step_cache: CacheStore[torch.Tensor] = CacheStore()

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
