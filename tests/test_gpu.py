"""The device plumbing on a real GPU (marker `gpu`: run on the device machine, skipped and counted elsewhere).
The CPU suite exercises the same code with device="cpu"; these check what only CUDA can show."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.model.checkpoint import load_checkpoint
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.packing import pack_batch
from serving.pipeline.request import GenerationRequest
from serving.pipeline.step_cache import UNCACHED, CacheStore
from serving.pipeline.understand import ChatResult, Understander
from serving.runtime.fast_path import FastPath
from serving.runtime.torch_backend import transformer_call
from serving.runtime.torch_stages import TorchStages, warm_up
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


def _t2i_cfg_pair(model: OmniGen2Transformer) -> dict[str, torch.Tensor]:
    """A text-to-image CFG pair packed as the BLS packs it: prompts of different lengths, an empty reference slot."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(16, 16, 16, generator=generator)
    texts = [torch.randn(n, model.config.text_feat_dim, generator=generator) for n in (23, 9)]
    feats = torch.zeros(2, 32, model.config.text_feat_dim)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    for row, text in enumerate(texts):
        feats[row, : len(text)], mask[row, : len(text)] = text, True
    packed = pack_batch(
        [latent, latent],
        torch.tensor([0.3, 0.3]),
        feats,
        mask,
        [None, None],
        patch_size=model.config.patch_size,
        axes_dim=model.config.axes_dim_rope,
        min_ref_slots=1,
    )
    return packed.as_inputs()


def _velocity(model: OmniGen2Transformer, fast: FastPath, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    stages = TorchStages(model, fast)
    warm_up(stages)
    for _ in range(3):  # CUDA graphs record on a shape's second call and replay from the third
        velocity, _ = transformer_call(stages, inputs, [UNCACHED] * len(inputs["timestep"]), CacheStore())
    return velocity


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_the_compiled_fast_path_matches_the_dense_eager_transformer(tiny_checkpoint: Path, attention: str) -> None:
    """Compiled blocks (Triton kernels) with CUDA graphs, on each attention mode, against the reference's way."""
    model = OmniGen2Transformer.from_pretrained(tiny_checkpoint / "transformer", torch.bfloat16, "cuda")
    inputs = _t2i_cfg_pair(model)
    expected = _velocity(model, FastPath.off(), inputs)
    fast = FastPath(attention, trim_padding=True, compile=True, cuda_graphs=True, warmup=((128, 128),))
    assert relative_error(_velocity(model, fast, inputs), expected) <= 2e-2  # bf16 kernels of another order


def test_a_call_without_padding_qualifies_for_flash_attention(tiny_checkpoint: Path) -> None:
    """A branch alone, trimmed, gives SDPA no mask: with only the flash kernel allowed it must still run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = OmniGen2Transformer.from_pretrained(tiny_checkpoint / "transformer", torch.bfloat16, "cuda")
    single = {name: value[:1] for name, value in _t2i_cfg_pair(model).items()}
    expected = _velocity(model, FastPath.off(), single)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        velocity = _velocity(model, FastPath("sdpa", trim_padding=True), single)
    assert relative_error(velocity, expected) <= 2e-2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-graphs"])
def test_the_sdpa_kernel_order_runs_cudnn_attention(tiny_checkpoint: Path, compiled: bool) -> None:
    """`--sdpa-kernels cudnn,flash`: a branch alone (every attention call unmasked) runs cuDNN's kernel, eagerly and
    in compiled blocks with CUDA graphs (chosen when a block is traced, then captured), within the reference's
    tolerance. Flash allowed second shows the order is kept (compiled code lost a keyword `set_priority` in torch
    2.7: pytorch issues 149725, 155898); the padded warm-up calls keep SDPA's own choice (a bias: not flash either)."""
    model = OmniGen2Transformer.from_pretrained(tiny_checkpoint / "transformer", torch.bfloat16, "cuda")
    single = {name: value[:1] for name, value in _t2i_cfg_pair(model).items()}
    expected = _velocity(model, FastPath.off(), single)
    warmup = ((128, 128),) if compiled else ()
    graphs = {"compile": compiled, "cuda_graphs": compiled, "warmup": warmup}
    fast = FastPath("sdpa", trim_padding=True, sdpa_kernels=("cudnn", "flash"), **graphs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        velocity = _velocity(model, fast, single)  # the warm-up runs the compiled code before graphs capture it
    ran = {event.name for event in profile.events()}
    assert "aten::_scaled_dot_product_cudnn_attention" in ran
    assert "aten::_scaled_dot_product_flash_attention" not in ran
    assert relative_error(velocity, expected) <= 2e-2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-graphs"])
def test_folded_padding_runs_the_cfg_pair_on_cudnn(tiny_checkpoint: Path, compiled: bool) -> None:
    """`--padded-attention folded` (the CUDA default): the CFG pair's padded calls (prompts of 23 and 9 tokens in
    one call) go to SDPA unmasked with the grouped heads, so with `cudnn,flash` allowed every call runs cuDNN and
    none the memory-efficient kernel the bias needs, eagerly and in compiled blocks with CUDA graphs; within the
    reference's tolerance, and the bias path's."""
    model = OmniGen2Transformer.from_pretrained(tiny_checkpoint / "transformer", torch.bfloat16, "cuda")
    pair = _t2i_cfg_pair(model)
    expected = _velocity(model, FastPath.off(), pair)
    graphs = {"compile": compiled, "cuda_graphs": compiled, "warmup": ((128, 128),) if compiled else ()}
    bias = _velocity(model, FastPath("sdpa", trim_padding=True, **graphs), pair)
    fast = FastPath("sdpa", trim_padding=True, sdpa_kernels=("cudnn", "flash"), padded_attention="folded", **graphs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        velocity = _velocity(model, fast, pair)
    ran = {event.name for event in profile.events() if event.name.startswith("aten::_scaled_dot_product_")}
    assert "aten::_scaled_dot_product_cudnn_attention" in ran
    assert not ran & {"aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_attention_math"}
    assert relative_error(velocity, expected) <= 2e-2 and relative_error(velocity, bias) <= 2e-2
