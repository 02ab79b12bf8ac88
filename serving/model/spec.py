"""The few checkpoint facts the pipeline needs besides the graphs: read from the configs, carried to the BLS."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    dynamic_time_shift: bool = True  # scheduler/scheduler_config.json: shift the grid by resolution
    text_positions: int = 1024  # axes_lens[0]: the most text tokens a prompt may keep (the full model's 1024)
    hidden_size: int = 2520  # the transformer's width: sizes the step-cache state of a request

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the VAE's own latent space (what its decoder takes)."""
        return latents / self.vae_scaling_factor + self.vae_shift_factor

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "axes_dim_rope": list(self.axes_dim_rope)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelSpec:
        return cls(**{**raw, "axes_dim_rope": tuple(raw["axes_dim_rope"])})
