"""Load the parts of an OmniGen2 checkpoint in the official layout, unchanged.

    model_index.json  transformer/  vae/  mllm/  processor/  [scheduler/]

The transformer is this project's module (strict load of the official names), the VAE is diffusers'
`AutoencoderKL`, the MLLM is transformers' `Qwen2_5_VLForConditionalGeneration`, and `processor/` holds the
tokenizer and chat template.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import Qwen2_5_VLForConditionalGeneration

from serving.errors import CheckpointError
from serving.model.graphs import TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph
from serving.model.transformer import OmniGen2Transformer
from serving.runtime.base import ModelSpec

REQUIRED_FILES = (
    "model_index.json",
    "transformer/config.json",
    "vae/config.json",
    "mllm/config.json",
    "processor/tokenizer_config.json",
)


# The checkpoint part each component graph is built from.
GRAPH_PARTS = {"text_encoder": "mllm", "vae_encoder": "vae", "transformer": "transformer", "vae_decoder": "vae"}


def check_layout(checkpoint: Path) -> None:
    """Fail with the path of the first missing part, before any heavy loading starts."""
    if not checkpoint.is_dir():
        raise CheckpointError(str(checkpoint), "checkpoint folder not found")
    for relative in REQUIRED_FILES:
        if not (checkpoint / relative).is_file():
            raise CheckpointError(str(checkpoint / relative), "file not found (official OmniGen2 layout expected)")


def copy_processor(source: Path, target: Path) -> None:
    """Copy `processor/` files by content only: the source may be read-only test data."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, target / path.name)


@dataclass
class CheckpointModules:
    transformer: OmniGen2Transformer
    vae: Any  # AutoencoderKL; diffusers sets its attributes dynamically
    mllm: Any  # Qwen2_5_VLForConditionalGeneration
    processor_dir: Path

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            patch_size=self.transformer.config.patch_size,
            axes_dim_rope=self.transformer.config.axes_dim_rope,
            vae_scaling_factor=float(self.vae.config.scaling_factor),
            vae_shift_factor=float(self.vae.config.shift_factor),
        )


def load_checkpoint(checkpoint: Path | str, dtype: torch.dtype = torch.float32) -> CheckpointModules:
    checkpoint = Path(checkpoint)
    check_layout(checkpoint)
    return CheckpointModules(
        transformer=OmniGen2Transformer.from_pretrained(checkpoint / "transformer", dtype=dtype),
        vae=AutoencoderKL.from_pretrained(checkpoint / "vae", torch_dtype=dtype).eval(),
        mllm=Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint / "mllm", dtype=dtype).eval(),
        processor_dir=checkpoint / "processor",
    )


def load_graph(name: str, checkpoint: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """One component graph (serving/model/graphs.py) from the part of `checkpoint` it needs, weights in `dtype`."""
    part = checkpoint / GRAPH_PARTS[name]
    if not (part / "config.json").is_file():
        raise CheckpointError(str(part / "config.json"), f"file not found (the {name} graph needs it)")
    graph: torch.nn.Module
    if name == "transformer":
        graph = OmniGen2Transformer.from_pretrained(part, dtype)
    elif name == "text_encoder":
        graph = TextEncoderGraph(Qwen2_5_VLForConditionalGeneration.from_pretrained(part, dtype=dtype))
    else:
        vae = AutoencoderKL.from_pretrained(part, torch_dtype=dtype)
        graph = VaeEncoderGraph(vae) if name == "vae_encoder" else VaeDecoderGraph(vae)
    return graph.eval()
