"""Run the component graphs in PyTorch, in process: the eager reference and baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from serving.model.checkpoint import CheckpointModules, load_checkpoint
from serving.model.graphs import TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph
from serving.pipeline.step_cache import CacheStore, CallStats, Control, cached_transformer
from serving.runtime.fast_path import FastPath
from serving.runtime.torch_stages import TorchStages, warm_up


@torch.no_grad()
def run_graph(graph: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """One graph call on the graph's device, in its weights' dtype; float32 CPU tensors in and out (the contract)."""
    device = next(graph.parameters()).device
    output: torch.Tensor = graph(**{name: value.to(device) for name, value in inputs.items()})
    # contiguous(): bf16 convolutions on the CPU can answer in channels-last order, which DLPack consumers refuse.
    return output.float().cpu().contiguous()


@torch.no_grad()
def transformer_call(
    stages: TorchStages, inputs: Mapping[str, torch.Tensor], controls: Sequence[Control], store: CacheStore
) -> tuple[torch.Tensor, CallStats]:
    """A transformer call with step caching (a call without any goes straight through the stages), no autograd."""
    velocity, stats = cached_transformer(stages, stages.prepare(inputs), controls, store)
    return velocity, stats


class TorchBackend:
    """The graphs in the dtype `modules` were loaded in: float32, or bf16 like the `pytorch-bf16` components.
    `fast` is the transformer's fast path (compiled and warmed here, when it compiles: see `load_report`)."""

    def __init__(self, modules: CheckpointModules, fast: FastPath | None = None) -> None:
        self.spec = modules.spec
        self.text_encoder = TextEncoderGraph(modules.mllm).eval()
        self.vae_encoder = VaeEncoderGraph(modules.vae).eval()
        self.transformer_graph = modules.transformer.eval()
        self.vae_decoder = VaeDecoderGraph(modules.vae).eval()
        self.stages = TorchStages(self.transformer_graph, fast)
        self.step_cache: CacheStore[torch.Tensor] = CacheStore()
        self.load_report: dict[str, float] = warm_up(self.stages)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Path | str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        fast: FastPath | None = None,
    ) -> TorchBackend:
        return cls(load_checkpoint(checkpoint, dtype, device), fast)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_graph(self.text_encoder, input_ids=input_ids, attention_mask=attention_mask)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return run_graph(self.vae_encoder, image=image)

    def transformer(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return run_graph(self.transformer_graph, **inputs)

    def transformer_cached(
        self, inputs: Mapping[str, torch.Tensor], controls: Sequence[Control]
    ) -> tuple[torch.Tensor, CallStats]:
        return transformer_call(self.stages, inputs, controls, self.step_cache)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return run_graph(self.vae_decoder, latents=latents)
