"""What every component backend provides: the four graphs of the served tensor contract, on torch tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from serving.model.spec import ModelSpec
from serving.pipeline.step_cache import CacheStore, CallStats, Control


class ComponentBackend(Protocol):
    """text_encoder, vae_encoder, transformer and vae_decoder; names and shapes in docs/tensor_contract.md."""

    spec: ModelSpec
    step_cache: CacheStore  # TeaCache / TaylorSeer state of the requests in flight

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def transformer(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def transformer_cached(
        self, inputs: Mapping[str, torch.Tensor], controls: Sequence[Control]
    ) -> tuple[torch.Tensor, CallStats]:
        """One call whose rows compute, skip or extrapolate the main layers as their controls say."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
