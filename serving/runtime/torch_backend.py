"""Run the component graphs in PyTorch, in process: the eager reference and baseline."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from serving.model.checkpoint import CheckpointModules, load_checkpoint
from serving.model.graphs import TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph


class TorchBackend:
    def __init__(self, modules: CheckpointModules) -> None:
        self.spec = modules.spec
        self.text_encoder = TextEncoderGraph(modules.mllm).eval()
        self.vae_encoder = VaeEncoderGraph(modules.vae).eval()
        self.transformer_graph = modules.transformer.eval()
        self.vae_decoder = VaeDecoderGraph(modules.vae).eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | str) -> TorchBackend:
        return cls(load_checkpoint(checkpoint))

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae_encoder(image)

    @torch.no_grad()
    def transformer(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.transformer_graph(**inputs)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_decoder(latents)
