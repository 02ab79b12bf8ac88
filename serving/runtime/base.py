"""What every component backend provides: the four graphs of the served tensor contract, on torch tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class ModelSpec:
    """The few checkpoint facts the pipeline needs besides the graphs themselves."""

    patch_size: int
    axes_dim_rope: tuple[int, ...]
    vae_scaling_factor: float
    vae_shift_factor: float
    latent_channels: int = 16
    vae_scale: int = 8  # pixels per latent cell

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the VAE's own latent space (what its decoder takes)."""
        return latents / self.vae_scaling_factor + self.vae_shift_factor

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "axes_dim_rope": list(self.axes_dim_rope)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelSpec:
        return cls(**{**raw, "axes_dim_rope": tuple(raw["axes_dim_rope"])})


class ComponentBackend(Protocol):
    """text_encoder, vae_encoder, transformer and vae_decoder; names and shapes in docs/tensor_contract.md."""

    spec: ModelSpec

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def transformer(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
