"""Tensors across the Python backend, for the models that run torch (the BLS, `mllm`, the PyTorch components).

They cross as DLPack, never as numpy: with numpy 2 (the GPU image's) a `pb_utils.Tensor` built from an array, or
read with `as_numpy()`, is silently empty. The ONNX Runtime components keep numpy: they import no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from serving.model.devices import TORCH_DTYPES, check_dtype, resolve_device


def to_triton(name: str, value: np.ndarray | torch.Tensor) -> Any:
    """Triton takes C-ordered DLPack tensors only; split batches and channels-last results are neither."""
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value.contiguous()
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor))


def from_triton(tensor: Any) -> torch.Tensor:
    """A request input or response output as a torch tensor (zero-copy)."""
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def instance_placement(args: dict[str, str], precision: str) -> tuple[torch.device, torch.dtype]:
    """Where a model instance computes: its GPU for a KIND_GPU instance, else the CPU; refused here if that device
    cannot run the precision, before any weights load."""
    on_gpu = args.get("model_instance_kind") == "GPU"
    device = resolve_device(f"cuda:{args.get('model_instance_device_id', '0')}" if on_gpu else "cpu")
    dtype = TORCH_DTYPES[precision]
    check_dtype(device, dtype)
    return device, dtype
