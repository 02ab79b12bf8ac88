"""The component models served by a real `tritonserver` (loopback) give ONNX Runtime's results."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.grpc as triton_grpc

from serving.pipeline.packing import pack_batch
from serving.runtime.onnx_backend import OnnxBackend
from serving.triton.launcher import TritonServer

WIRE_TYPES = {"float32": "FP32", "bool": "BOOL", "int64": "INT64"}


def _infer(triton: TritonServer, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    wire = []
    for name, array in inputs.items():
        tensor = triton_grpc.InferInput(name, list(array.shape), WIRE_TYPES[array.dtype.name])
        tensor.set_data_from_numpy(array)
        wire.append(tensor)
    result = client.infer(model, wire).as_numpy(output)
    assert result is not None
    return result


def _encode_with_mllm(triton: TritonServer, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The BLS's prompt-encoding request to the decoupled `mllm` model: one response carrying `text_feats`."""
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    responses: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, value in (("input_ids", ids), ("attention_mask", mask)):
        tensor = triton_grpc.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.async_stream_infer("mllm", inputs, outputs=[triton_grpc.InferRequestedOutput("text_feats")])
    result, error = responses.get(timeout=60)
    client.stop_stream()
    assert error is None, error
    feats: np.ndarray = result.as_numpy("text_feats")
    return feats


def test_server_is_ready_on_loopback_only(triton: TritonServer) -> None:
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    assert client.is_server_ready()
    assert triton.grpc_url.startswith("127.0.0.1:")
    assert {m.name for m in client.get_model_repository_index().models} == {
        "vae_encoder",
        "transformer",
        "vae_decoder",
        "omnigen2",
        "mllm",
    }  # fmt: skip  (prompts are encoded by `mllm`: one Qwen2.5-VL per stack)


def test_components_match_onnx_runtime(triton: TritonServer, tiny_onnx: Path) -> None:
    backend = OnnxBackend(tiny_onnx, threads=1)
    ids = np.array([[1, 57, 71, 20, 2, 0], [1, 57, 71, 20, 90, 2]], dtype=np.int64)
    mask = (np.arange(6)[None] < np.array([[5], [6]])).astype(np.int64)
    served = _encode_with_mllm(triton, ids, mask)
    local = backend.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-6)  # the mllm's PyTorch run of the ONNX graph

    image = (np.random.default_rng(0).random((2, 3, 32, 48), dtype=np.float32) * 2 - 1).astype(np.float32)
    latents = _infer(triton, "vae_encoder", {"image": image}, "latents")
    np.testing.assert_allclose(latents, backend.encode_image(torch.from_numpy(image)).numpy(), rtol=1e-5, atol=1e-6)
    decoded = _infer(triton, "vae_decoder", {"latents": latents}, "image")
    # A copy: Triton's arrays are read-only, which torch.from_numpy warns at.
    np.testing.assert_allclose(decoded, backend.decode(torch.from_numpy(latents.copy())).numpy(), rtol=1e-5, atol=1e-6)

    packed = pack_batch(
        [torch.randn(16, 8, 8), torch.randn(16, 4, 6)],
        torch.tensor([0.2, 0.6]),
        torch.randn(2, 7, 64),
        torch.tensor([[1] * 7, [1] * 3 + [0] * 4]),
        [None, [torch.randn(16, 4, 4)]],
        patch_size=2,
        axes_dim=backend.spec.axes_dim_rope,
        min_ref_slots=1,
    )
    wire = {k: v.numpy() for k, v in packed.as_inputs().items()}
    wire["timestep"] = wire["timestep"][:, None]  # Triton's spelling of a per-sample scalar: [batch, 1]
    velocity = _infer(triton, "transformer", wire, "velocity")
    np.testing.assert_allclose(velocity, backend.transformer(packed.as_inputs()).numpy(), rtol=1e-5, atol=1e-6)
