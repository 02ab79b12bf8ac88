"""Run the component graphs in PyTorch, in process: the eager reference and baseline."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from serving.model.checkpoint import CheckpointModules, load_checkpoint
from serving.model.graphs import TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph


@torch.no_grad()
def run_graph(graph: nn.Module, autocast: torch.dtype | None, **inputs: torch.Tensor) -> torch.Tensor:
    """One graph call; with `autocast` (bf16) the matrix work runs in that dtype, the output is float32."""
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        output: torch.Tensor = graph(**inputs)
    return output.float()


class TorchBackend:
    """`autocast=torch.bfloat16` runs the graphs' matrix work in bf16 (float32 in and out), like `pytorch-bf16`."""

    def __init__(self, modules: CheckpointModules, autocast: torch.dtype | None = None) -> None:
        self.spec = modules.spec
        self.autocast = autocast
        self.text_encoder = TextEncoderGraph(modules.mllm).eval()
        self.vae_encoder = VaeEncoderGraph(modules.vae).eval()
        self.transformer_graph = modules.transformer.eval()
        self.vae_decoder = VaeDecoderGraph(modules.vae).eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | str, autocast: torch.dtype | None = None) -> TorchBackend:
        return cls(load_checkpoint(checkpoint), autocast)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_graph(self.text_encoder, self.autocast, input_ids=input_ids, attention_mask=attention_mask)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return run_graph(self.vae_encoder, self.autocast, image=image)

    def transformer(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return run_graph(self.transformer_graph, self.autocast, **inputs)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return run_graph(self.vae_decoder, self.autocast, latents=latents)
