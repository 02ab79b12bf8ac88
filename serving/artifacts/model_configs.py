"""The config.pbtxt of each model in the generated repository (serving/artifacts/repository.py writes them), and the
settings behind them: the components' batching and instances, the BLS settings a backend gets, the `mllm` and safety
models. Every component keeps the tensor contract of docs/tensor_contract.md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from serving.artifacts.engines import engine_max_batch
from serving.choices import PRECISIONS
from serving.errors import SettingError
from serving.model.contract import static_dims
from serving.model.devices import resolve_device
from serving.pipeline.request import DEFAULT_LIMITS, Limits
from serving.pipeline.step_cache import CONTROL_WIDTH
from serving.runtime.fast_path import FastPath
from serving.safety.settings import SafetySettings, nudenet_graph
from serving.triton.bls_settings import BlsSettings
from serving.triton.model_names import BLS_MODEL, MLLM_MODEL, SAFETY_CLASSIFIER, TRANSFORMER, VAE_DECODER, VAE_ENCODER

DTYPES = {
    "float32": mc.TYPE_FP32,
    "float16": mc.TYPE_FP16,
    "bfloat16": mc.TYPE_BF16,
    "int64": mc.TYPE_INT64,
    "int32": mc.TYPE_INT32,
    "bool": mc.TYPE_BOOL,
}


@dataclass(frozen=True)
class ComponentSettings:
    max_batch_size: int  # samples per execution, after Triton's dynamic batcher merged requests
    queue_delay_us: int = 0  # 0: batch what is already queued, never wait (the BLS is latency-bound per step)
    instances: int = 1
    intra_op_threads: int = 0  # ONNX Runtime / PyTorch threads per instance; 0 = all cores


COMPONENTS: dict[str, ComponentSettings] = {
    VAE_ENCODER: ComponentSettings(max_batch_size=8),
    TRANSFORMER: ComponentSettings(max_batch_size=64),
    VAE_DECODER: ComponentSettings(max_batch_size=16),
}
# The output-image classifier: images of many requests in one call (it is small: 12 MB, 320 x 320 inputs).
SAFETY = ComponentSettings(max_batch_size=32)
MAX_DETECTIONS = 32  # detection rows per image in the classifier's output


def engine_settings(settings: ComponentSettings, shapes: dict[str, Any]) -> ComponentSettings:
    """A TensorRT engine takes at most the batch its optimisation profile was built for, and Triton refuses a config
    that promises more: the engine's bound caps the model's `max_batch_size`."""
    return replace(settings, max_batch_size=min(settings.max_batch_size, engine_max_batch(shapes)))


def _tensor(
    entry: dict[str, Any], config_cls: type[mc.ModelInput] | type[mc.ModelOutput]
) -> mc.ModelInput | mc.ModelOutput:
    """Manifest tensor -> ModelInput/ModelOutput without the batch axis (Triton adds it: max_batch_size > 0)."""
    dims = static_dims(entry["shape"][1:])
    tensor = config_cls(name=entry["name"], data_type=DTYPES[entry["dtype"]], dims=dims or [1])
    if not dims:  # a per-sample scalar: Triton spells shape [batch] as dims [1] reshaped to []
        tensor.reshape.SetInParent()
    return tensor


def component_config(
    name: str,
    contract: dict[str, Any],
    backend: str,
    settings: ComponentSettings,
    precision: str = "fp32",
    on_gpu: bool = False,
    fast: FastPath | None = None,
) -> mc.ModelConfig:
    """`fast`: the PyTorch transformer's fast path (serving/runtime/fast_path.py), as model parameters."""
    config = mc.ModelConfig(name=name, max_batch_size=settings.max_batch_size)
    config.input.extend(_tensor(t, mc.ModelInput) for t in contract["inputs"])
    config.output.extend(_tensor(t, mc.ModelOutput) for t in contract["outputs"])
    config.dynamic_batching.max_queue_delay_microseconds = settings.queue_delay_us
    if backend in ("onnxruntime", "pytorch"):
        config.backend = "python"
        kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
        config.instance_group.add(kind=kind, count=settings.instances)
        config.parameters["intra_op_threads"].string_value = str(settings.intra_op_threads)
        # CPU components take turns on the cores (cpu_lane.py); GPU ones queue on the device instead.
        config.parameters["cpu_lane"].string_value = "0" if on_gpu else "1"
        if backend == "onnxruntime" and name != TRANSFORMER:  # the transformer: its stage graphs (onnx_model.py)
            config.parameters["onnx_file"].string_value = contract["file"]
        elif backend == "pytorch":
            config.parameters["precision"].string_value = precision
            if name == TRANSFORMER and fast is not None:
                for key, value in fast.to_params().items():
                    config.parameters[key].string_value = value
        if name == TRANSFORMER:  # per-sample step-cache controls (serving/pipeline/step_cache.py); absent: uncached
            if settings.instances != 1:  # the cache state lives in one process: a request's steps must meet it there
                raise SettingError("instances", "the transformer keeps step-cache state: one instance per stack")
            config.input.add(name="cache_control", data_type=mc.TYPE_INT64, dims=[CONTROL_WIDTH], optional=True)
            config.input.add(name="cache_threshold", data_type=mc.TYPE_FP64, dims=[1], optional=True)
    else:
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=settings.instances)
    return config


BLS = BlsSettings()
# Where a backend's calls differ. bf16 PyTorch on CPU: calls past about 8k tokens cost more per token (activations
# outgrow the caches; benchmarks/README.md, the call token cap), so they are cut there. Every other CPU backend keeps
# the default cap, which bounds a call's attention memory (BlsSettings). The default call cost fits bf16 calls
# (benchmarks/README.md).
BLS_BY_BACKEND = {"pytorch-bf16": BlsSettings(max_call_tokens=8192)}
# PyTorch on a GPU: its attention kernels (flash, cuDNN, memory-efficient) hold no score matrix, so a call's memory
# grows with its tokens, not their square, and the cap is the front end's in-flight step budget (65 536 tokens by
# default): the steps of every admitted generation share one call. Not yet measured on a GPU.
BLS_ON_GPU = BlsSettings(max_call_tokens=65_536)


def served_name(backend: str, precision: str) -> str:
    """What GetModelInfo reports as the backend: `onnxruntime`, `pytorch-bf16`, `tensorrt-fp8`, ..."""
    return f"{backend}-{precision}" if backend in PRECISIONS else backend


def bls_settings(backend: str, precision: str, max_call_tokens: int | None = None, device: str = "cpu") -> BlsSettings:
    """The BLS settings a backend gets (BLS_BY_BACKEND on the CPU, BLS_ON_GPU for PyTorch on a GPU), with an
    operator's per-call token cap."""
    if backend == "pytorch" and resolve_device(device).type == "cuda":
        settings = BLS_ON_GPU
    else:
        settings = BLS_BY_BACKEND.get(served_name(backend, precision), BLS)
    return settings if max_call_tokens is None else replace(settings, max_call_tokens=max_call_tokens)


def bls_config(
    spec: dict[str, Any],
    checkpoint_sha256: str,
    backend: str,
    settings: BlsSettings = BLS,
    limits: Limits = DEFAULT_LIMITS,
) -> mc.ModelConfig:
    """The decoupled `omnigen2` model; its wire format is documented in serving/triton/bls.py.

    `checkpoint_sha256` and `backend` ride along as parameters so the API's GetModelInfo can report them.
    """
    config = mc.ModelConfig(name=BLS_MODEL, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    config.input.add(name="request", data_type=mc.TYPE_STRING, dims=[1])
    config.input.add(name="images", data_type=mc.TYPE_STRING, dims=[-1], optional=True)
    config.output.add(name="event", data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(name="preview", data_type=mc.TYPE_UINT8, dims=[-1, -1, -1, 3])
    config.output.add(name="images", data_type=mc.TYPE_UINT8, dims=[-1, -1, -1, 3])
    config.output.add(name="latents", data_type=mc.TYPE_FP32, dims=[-1, -1, -1, -1])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=settings.instances)
    config.parameters["spec"].string_value = json.dumps(spec)
    for name, value in settings.to_parameters().items():
        config.parameters[name].string_value = value
    config.parameters["limits"].string_value = json.dumps(asdict(limits))  # the front end's, enforced again here
    config.parameters["checkpoint_sha256"].string_value = checkpoint_sha256
    config.parameters["backend"].string_value = backend
    return config


def mllm_config(on_gpu: bool, precision: str, text_dim: int) -> mc.ModelConfig:
    """The decoupled `mllm` model: visual understanding, and the prompt encoder of the BLS on the same weights (one
    Qwen2.5-VL per stack). Its wire format is documented in serving/triton/mllm.py."""
    config = mc.ModelConfig(name=MLLM_MODEL, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    config.input.add(name="request", data_type=mc.TYPE_STRING, dims=[1], optional=True)
    config.input.add(name="images", data_type=mc.TYPE_STRING, dims=[-1], optional=True)
    config.input.add(name="input_ids", data_type=mc.TYPE_INT64, dims=[-1, -1], optional=True)
    config.input.add(name="attention_mask", data_type=mc.TYPE_INT64, dims=[-1, -1], optional=True)
    config.output.add(name="event", data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(name="text_feats", data_type=mc.TYPE_FP32, dims=[-1, -1, text_dim])
    kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=1)
    config.parameters["cpu_lane"].string_value = "0" if on_gpu else "1"  # see serving/triton/cpu_lane.py
    config.parameters["precision"].string_value = precision
    return config


def safety_config(safety: SafetySettings, settings: ComponentSettings = SAFETY) -> mc.ModelConfig:
    """The `safety_classifier` component (serving/triton/safety_model.py), on the CPU under ONNX Runtime whatever
    runs the other components: its tensor contract is in docs/tensor_contract.md."""
    config = mc.ModelConfig(name=SAFETY_CLASSIFIER, backend="python", max_batch_size=settings.max_batch_size)
    config.input.add(name="image", data_type=mc.TYPE_UINT8, dims=[safety.side, safety.side, 3])
    config.input.add(name="image_size", data_type=mc.TYPE_INT32, dims=[2])
    config.output.add(name="class_scores", data_type=mc.TYPE_FP32, dims=[len(safety.labels)])
    config.output.add(name="detections", data_type=mc.TYPE_FP32, dims=[MAX_DETECTIONS, 6])
    config.dynamic_batching.max_queue_delay_microseconds = settings.queue_delay_us
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=settings.instances)
    config.parameters["intra_op_threads"].string_value = str(settings.intra_op_threads)
    config.parameters["cpu_lane"].string_value = "1"
    config.parameters["onnx_file"].string_value = nudenet_graph().name
    config.parameters["max_detections"].string_value = str(MAX_DETECTIONS)
    config.parameters["labels"].string_value = json.dumps(list(safety.labels))
    return config
