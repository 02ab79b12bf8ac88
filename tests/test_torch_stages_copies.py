"""Host-to-device copies of one PyTorch transformer call (serving/runtime/torch_stages.py).

A call's inputs are CPU tensors (the served transformer's come out of Triton's shared memory). Copying pageable host
memory to a GPU waits for the work already queued on the stream, so a copy made after the call's first kernel stops
the host until the device has caught up, and the device then idles while the next kernels are launched. Each input
must therefore cross once per call, and before anything runs on the device.

The model lives on the meta device here: it stands for the GPU (a CPU model's `.to("cpu")` copies nothing), and a
dispatch mode sees every copy and operator in order. The call ends in the velocity's copy back to the host, which
meta tensors cannot make: everything before it is what is checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from export.make_checkpoint import TRANSFORMERS
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.step_cache import UNCACHED, CacheStore
from serving.runtime.fast_path import FastPath, warmup_inputs
from serving.runtime.torch_backend import transformer_call
from serving.runtime.torch_stages import TorchStages


class _DeviceLog(TorchDispatchMode):
    """Every operator that makes a meta tensor, in order: ("copy", bytes) for a host-to-device copy, ("op", name)
    for anything the device itself would run."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, Any]] = []

    def __torch_dispatch__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if not (isinstance(out, torch.Tensor) and out.device.type == "meta"):
            return out
        source = args[0] if args else None
        if isinstance(source, torch.Tensor) and source.device.type == "cpu":
            self.events.append(("copy", source.numel() * source.element_size()))
        else:
            self.events.append(("op", str(func)))
        return out


def _call_log(fast: FastPath, batch: int, refs: int) -> tuple[_DeviceLog, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        model = OmniGen2Transformer(TRANSFORMERS["tiny"]).eval()
    stages = TorchStages(model, fast)
    # CFG branches: prompts of different lengths, so the call has padded keys and a joint mask to copy as well
    inputs = warmup_inputs(model, 64, 64, batch=batch, refs=refs, ragged=True)
    log = _DeviceLog()
    with log, pytest.raises(NotImplementedError, match="meta tensor"):  # the velocity's copy back to the host
        transformer_call(stages, inputs, [UNCACHED] * batch, CacheStore())
    return log, inputs


@pytest.mark.parametrize(
    "fast", [FastPath.off(), FastPath(attention="sdpa", trim_padding=True)], ids=["reference", "sdpa-trimmed"]
)
@pytest.mark.parametrize(("batch", "refs"), [(2, 0), (3, 1)], ids=["t2i", "edit"])
def test_every_copy_precedes_the_first_kernel(fast: FastPath, batch: int, refs: int) -> None:
    log, _ = _call_log(fast, batch, refs)
    kinds = [kind for kind, _ in log.events]
    first_op = kinds.index("op")
    late = [event for event in log.events[first_op:] if event[0] == "copy"]
    assert not late, f"{len(late)} host-to-device copies after the call's first kernel (each waits for the device)"


@pytest.mark.parametrize(("batch", "refs"), [(2, 0), (3, 1)], ids=["t2i", "edit"])
def test_each_input_crosses_once(batch: int, refs: int) -> None:
    """The RoPE tables (most of a step's bytes) and the timesteps were copied twice: for the refiners and again for
    the main layers (and the head)."""
    log, inputs = _call_log(FastPath.off(), batch, refs)
    copied = sum(nbytes for kind, nbytes in log.events if kind == "copy")
    # Each input once, and the joint mask of the main layers, built on the host from the three masks
    masks = ("text_mask", "ref_mask", "img_mask")
    once = sum(t.numel() * t.element_size() for t in inputs.values()) + sum(inputs[m][0].numel() for m in masks) * batch
    assert copied <= once
