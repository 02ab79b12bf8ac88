"""Triton Python-backend model that runs one component graph in PyTorch, in float32 or bfloat16.

The `pytorch` repository backend: the same modules the ONNX graphs are exported from (serving/model/graphs.py),
loaded from the checkpoint part linked into the version folder. In bfloat16 the weights are bf16, as the
reference pipeline runs; on CPUs with AMX or AVX512-BF16 that is faster than float32 (2.6-2.7x for 16 samples
of `small` on the 2-core dev machine) and, unlike float32, gains from batch: the CPU counterpart of serving bf16
engines on a GPU. Inputs and outputs keep the float32 tensor contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from serving.model.checkpoint import load_graph
from serving.runtime.torch_backend import run_graph
from serving.triton.component_model import ComponentModel

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        self.graph = load_graph(args["model_name"], self.version_dir, PRECISIONS[self.params["precision"]])
        threads = int(self.params.get("intra_op_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        inputs = {name: torch.from_numpy(value) for name, value in feed.items()}
        return [run_graph(self.graph, **inputs).numpy()]
