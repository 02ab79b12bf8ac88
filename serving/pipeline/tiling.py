"""VAE decoding in overlapping tiles, so a large output never passes through the decoder in one piece.

The decoder's activations grow with the output's area (the issue's 2048x2048 image took the VAE decoder stub to
18 GB); tiles bound them by the tile's. Neighbouring tiles overlap and are blended with linear ramps across the
overlap, as diffusers' tiled VAE does, so seams do not show; the result differs slightly from an untiled decode,
which is why only outputs larger than one tile are tiled.

The BLS tiles, not the decoder: diffusers' own tiling lives in AutoencoderKL.decode, which the served decoder graph
does not go through (graphs.VaeDecoderGraph calls the decoder module itself, as exported to ONNX and TensorRT); here
each tile is one call of whichever `vae_decoder` model is served (`decode`, a Triton call in the BLS), so every
backend's memory is bounded alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import torch

Decode = Callable[[torch.Tensor], Awaitable[torch.Tensor]]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` covering `length`, each overlapping the next by at least `overlap`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _ramp(size: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    """Weights along one axis of a tile: linear over `overlap` at the edges that meet a neighbour, 1 elsewhere."""
    weights = torch.ones(size)
    steps = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
    if rise:
        weights[:overlap] = steps
    if fall:
        weights[size - overlap :] = steps.flip(0)
    return weights


async def decode_tiled(latents: torch.Tensor, decode: Decode, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, h*scale, w*scale), decoding tiles of `tile` latent pixels one at a time."""
    batch, _, height, width = latents.shape
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(rows) == len(cols) == 1:
        return await decode(latents)
    image: torch.Tensor | None = None
    weight = torch.zeros(1, 1, height * scale, width * scale)
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            piece = await decode(latents[:, :, y : y + tile, x : x + tile])
            if image is None:
                image = torch.zeros(batch, piece.shape[1], height * scale, width * scale)
            pixels = overlap * scale
            window = torch.outer(
                _ramp(piece.shape[2], pixels, i > 0, i < len(rows) - 1),
                _ramp(piece.shape[3], pixels, j > 0, j < len(cols) - 1),
            )
            top, left = y * scale, x * scale
            image[:, :, top : top + piece.shape[2], left : left + piece.shape[3]] += piece * window
            weight[:, :, top : top + piece.shape[2], left : left + piece.shape[3]] += window
    assert image is not None
    return image / weight
