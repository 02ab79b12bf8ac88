"""The tokens a generation used, counted where they are known: after tokenizing, encoding and sizing.

GenerateResponse.usage (proto/omnigen2/v1/omnigen2.proto) documents what counts; unlike cost.py's admission
bounds, these are exact, and each is counted once per request, not per step or guidance branch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationUsage:
    text_tokens: int  # the templated prompt, and the negative prompt where guidance uses it
    image_tokens: int  # the reference images' latent patches
    output_tokens: int  # the generated images' latent patches, all images together


def generation_usage(
    texts: Iterable[torch.Tensor],
    ref_latents: Iterable[torch.Tensor],
    gen_size: tuple[int, int],
    images: int,
    vae_scale: int,
    patch_size: int,
) -> GenerationUsage:
    """`texts`: the encoded prompts' unpadded (L, D) features; `ref_latents`: (C, h, w) per reference image;
    `gen_size`: (height, width) in pixels of the generated images, `images` of them."""
    cell = vae_scale * patch_size
    return GenerationUsage(
        text_tokens=sum(t.shape[0] for t in texts),
        image_tokens=sum((r.shape[1] // patch_size) * (r.shape[2] // patch_size) for r in ref_latents),
        output_tokens=images * (gen_size[0] // cell) * (gen_size[1] // cell),
    )
