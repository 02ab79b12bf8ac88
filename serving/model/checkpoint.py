"""Load the parts of an OmniGen2 checkpoint in the official layout, unchanged.

    model_index.json  transformer/  vae/  mllm/  processor/  [scheduler/]

The transformer is this project's module (strict load of the official names), the VAE is diffusers'
`AutoencoderKL`, the MLLM is transformers' `Qwen2_5_VLForConditionalGeneration`, and `processor/` holds the
tokenizer and chat template.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from serving.errors import CheckpointError
from serving.model.config import TransformerConfig
from serving.model.graphs import TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph
from serving.model.spec import ModelSpec
from serving.model.transformer import WEIGHTS_STEM, OmniGen2Transformer
from serving.model.weights import check_shapes, weight_files

if TYPE_CHECKING:  # imported by load_mllm when it runs (see load_vae)
    from transformers import Qwen2_5_VLForConditionalGeneration

REQUIRED_FILES = (
    "model_index.json",
    "transformer/config.json",
    "vae/config.json",
    "mllm/config.json",
    "processor/tokenizer_config.json",
)
# Weights files per part (one file or an index of shards), as diffusers and transformers name them.
WEIGHT_STEMS = {"transformer": WEIGHTS_STEM, "vae": WEIGHTS_STEM, "mllm": "model"}
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


# The checkpoint part each component graph is built from.
GRAPH_PARTS = {"text_encoder": "mllm", "vae_encoder": "vae", "transformer": "transformer", "vae_decoder": "vae"}


def check_layout(checkpoint: Path) -> None:
    """Fail with the path of the first missing part or shard, before any heavy loading starts."""
    if not checkpoint.is_dir():
        raise CheckpointError(str(checkpoint), "checkpoint folder not found")
    for relative in REQUIRED_FILES:
        if not (checkpoint / relative).is_file():
            raise CheckpointError(str(checkpoint / relative), "file not found (official OmniGen2 layout expected)")
    for part, stem in WEIGHT_STEMS.items():
        weight_files(checkpoint / part, stem)


def verify_checkpoint(checkpoint: Path) -> None:
    """check_layout, then the transformer's tensors against its config from the file headers (seconds, no
    weights read): what a stack checks before it serves. The VAE and MLLM are checked by their loaders."""
    check_layout(checkpoint)
    part = checkpoint / "transformer"
    check_shapes(OmniGen2Transformer.on_meta(part), weight_files(part, WEIGHT_STEMS["transformer"]))


def copy_processor(source: Path, target: Path) -> None:
    """Copy `processor/` files by content only: the source may be read-only test data."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, target / path.name)


def _json(path: Path) -> dict[str, Any]:
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(str(path), f"not readable as JSON: {exc}") from exc
    return raw


def read_spec(checkpoint: Path) -> ModelSpec:
    """The pipeline's facts from the configs alone (no weights): transformer, VAE and scheduler settings."""
    transformer = TransformerConfig.from_file(checkpoint / "transformer" / "config.json")
    vae = _json(checkpoint / "vae" / "config.json")
    scheduler_path = checkpoint / SCHEDULER_CONFIG
    scheduler = _json(scheduler_path) if scheduler_path.is_file() else {}
    return spec_from_configs(transformer, vae, scheduler)


def spec_from_configs(transformer: TransformerConfig, vae: dict[str, Any], scheduler: dict[str, Any]) -> ModelSpec:
    """read_spec's facts from configs already in memory (a model built without a checkpoint on disk)."""
    return ModelSpec(
        patch_size=transformer.patch_size,
        axes_dim_rope=transformer.axes_dim_rope,
        vae_scaling_factor=float(vae.get("scaling_factor", 0.3611)),
        vae_shift_factor=float(vae.get("shift_factor") or 0.0),
        latent_channels=int(vae.get("latent_channels", 16)),
        vae_scale=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
        dynamic_time_shift=bool(scheduler.get("dynamic_time_shift", True)),
        text_positions=transformer.axes_lens[0],
        hidden_size=transformer.hidden_size,
    )


def text_feature_dim(checkpoint: Path) -> int:
    """The MLLM's hidden size: the width of the prompt features the transformer reads."""
    config = _json(checkpoint / "mllm" / "config.json")
    return int(config.get("text_config", config)["hidden_size"])


def load_vae(part: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> Any:
    """diffusers' AutoencoderKL (single or sharded safetensors), in `dtype` on `device`."""
    # Imported here: each served component is a process of its own, and one that loads only the VAE (or only the
    # transformer) should not hold transformers' (or diffusers') modules in memory.
    from diffusers import AutoencoderKL

    weight_files(part, WEIGHT_STEMS["vae"])
    try:
        vae = AutoencoderKL.from_pretrained(part, torch_dtype=dtype)
    except (OSError, RuntimeError, ValueError) as exc:  # shape mismatches and unreadable files alike
        raise CheckpointError(str(part), f"VAE does not load: {exc}") from exc
    return vae.to(device).eval()


def load_mllm(part: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> Qwen2_5_VLForConditionalGeneration:
    """transformers' Qwen2.5-VL (single or sharded safetensors), materialised straight into `dtype` on `device`.

    sdpa: PyTorch's fused attention (flash / memory-efficient kernels on GPU), no extra package needed.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration  # see load_vae

    weight_files(part, WEIGHT_STEMS["mllm"])
    try:
        model: Qwen2_5_VLForConditionalGeneration = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            part, dtype=dtype, device_map=str(device), attn_implementation="sdpa"
        )
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(str(part), f"MLLM does not load: {exc}") from exc
    model.eval()  # in place; transformers' override returns it untyped
    return model


@dataclass
class CheckpointModules:
    transformer: OmniGen2Transformer
    vae: Any  # AutoencoderKL; diffusers sets its attributes dynamically
    mllm: Qwen2_5_VLForConditionalGeneration
    processor_dir: Path
    spec: ModelSpec


def load_checkpoint(
    checkpoint: Path | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> CheckpointModules:
    checkpoint = Path(checkpoint)
    check_layout(checkpoint)
    return CheckpointModules(
        transformer=OmniGen2Transformer.from_pretrained(checkpoint / "transformer", dtype, device),
        vae=load_vae(checkpoint / "vae", dtype, device),
        mllm=load_mllm(checkpoint / "mllm", dtype, device),
        processor_dir=checkpoint / "processor",
        spec=read_spec(checkpoint),
    )


def load_graph(
    name: str, checkpoint: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """One component graph (serving/model/graphs.py) from the part of `checkpoint` it needs, weights in `dtype`."""
    part = checkpoint / GRAPH_PARTS[name]
    if not (part / "config.json").is_file():
        raise CheckpointError(str(part / "config.json"), f"file not found (the {name} graph needs it)")
    graph: torch.nn.Module
    if name == "transformer":
        graph = OmniGen2Transformer.from_pretrained(part, dtype, device)
    elif name == "text_encoder":
        graph = TextEncoderGraph(load_mllm(part, dtype, device))
    else:
        vae = load_vae(part, dtype, device)
        graph = VaeEncoderGraph(vae) if name == "vae_encoder" else VaeDecoderGraph(vae)
    return graph.eval()
