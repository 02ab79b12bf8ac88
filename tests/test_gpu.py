"""The device plumbing on a real GPU (marker `gpu`: run on the device machine, skipped and counted elsewhere).
The CPU suite exercises the same code with device="cpu"; these check what only CUDA can show."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.model.checkpoint import load_checkpoint
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.request import GenerationRequest
from serving.pipeline.understand import ChatResult, Understander
from tests.golden import relative_error

pytestmark = pytest.mark.gpu


def test_components_load_straight_onto_the_gpu(tiny_checkpoint: Path) -> None:
    modules = load_checkpoint(tiny_checkpoint, torch.bfloat16, "cuda")
    for module in (modules.transformer, modules.vae, modules.mllm):
        assert {p.device.type for p in module.parameters()} == {"cuda"}


def test_eager_pipeline_on_cuda_matches_the_cpu(tiny_checkpoint: Path) -> None:
    request = GenerationRequest(prompt="a red car", width=64, height=64, steps=3, seed=5)
    on_gpu = OmniGen2Pipeline.from_pretrained(tiny_checkpoint, device="cuda")(request)
    on_cpu = OmniGen2Pipeline.from_pretrained(tiny_checkpoint, device="cpu")(request)
    assert on_gpu.latents.device.type == "cpu"  # the contract: float32 CPU tensors out
    assert relative_error(on_gpu.latents, on_cpu.latents) <= 1e-3


def test_understanding_stops_on_the_models_device(tiny_checkpoint: Path) -> None:
    """The stopping criterion's flags live on the ids' device (a CPU tensor beside a CUDA model failed)."""
    from serving.pipeline.chat_request import chat_request_from_params

    understander = Understander.from_dirs(
        tiny_checkpoint / "mllm", tiny_checkpoint / "processor", "cuda", torch.bfloat16
    )
    request = chat_request_from_params(
        {"messages": [{"role": "user", "content": [{"text": "hi"}]}], "max_new_tokens": 4}, []
    )
    result = list(understander.stream(request, lambda: False))[-1]
    assert isinstance(result, ChatResult) and 0 < len(result.token_ids) <= 4
