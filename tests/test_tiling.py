"""Tiled VAE decoding (serving/pipeline/tiling.py): tiles cover the image, overlaps blend, small outputs stay whole."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
import torch.nn.functional as F

from serving.pipeline.tiling import decode_tiled, tile_starts


def test_tiles_cover_the_length_with_at_least_the_overlap() -> None:
    assert tile_starts(100, 128, 16) == [0]
    assert tile_starts(300, 128, 16) == [0, 112, 172]
    for length in range(129, 400, 7):
        starts = tile_starts(length, 128, 16)
        assert starts[0] == 0 and starts[-1] + 128 == length
        assert all(b - a <= 128 - 16 for a, b in itertools.pairwise(starts))


def _run(latents: torch.Tensor, decoder: object, tile: int) -> tuple[torch.Tensor, int]:
    calls = []

    async def decode(piece: torch.Tensor) -> torch.Tensor:
        calls.append(piece.shape)
        return decoder(piece)  # type: ignore[operator]

    return asyncio.run(decode_tiled(latents, decode, tile, 4, 8)), len(calls)


def test_a_local_decoder_gives_the_untiled_result_exactly() -> None:
    latents = torch.randn(2, 16, 40, 24)

    def local(x: torch.Tensor) -> torch.Tensor:  # each output pixel depends on its own latent cell only
        return F.interpolate(torch.tanh(x[:, :3] * x[:, 3:6]), scale_factor=8, mode="nearest")

    tiled, calls = _run(latents, local, tile=16)
    assert calls == len(tile_starts(40, 16, 4)) * len(tile_starts(24, 16, 4)) == 6
    torch.testing.assert_close(tiled, local(latents))


def test_a_decoder_that_sees_its_neighbours_blends_without_seams() -> None:
    latents = torch.randn(1, 16, 48, 48)

    def blurry(x: torch.Tensor) -> torch.Tensor:  # 3x3 latent context, as a convolutional decoder has (more)
        return F.interpolate(F.avg_pool2d(x[:, :3], 3, stride=1, padding=1, count_include_pad=False), scale_factor=8)

    tiled, _ = _run(latents, blurry, tile=16)
    whole = blurry(latents)
    assert tiled.shape == whole.shape
    assert float((tiled - whole).abs().mean()) < 0.05 * float(whole.abs().mean())


def test_small_outputs_are_decoded_whole() -> None:
    latents = torch.randn(1, 16, 16, 8)
    _, calls = _run(latents, lambda x: F.interpolate(x[:, :3], scale_factor=8), tile=16)
    assert calls == 1


@pytest.mark.parametrize("size", [(17, 16), (16, 33)])
def test_odd_sizes_are_covered(size: tuple[int, int]) -> None:
    latents = torch.randn(1, 16, *size)
    tiled, _ = _run(latents, lambda x: F.interpolate(x[:, :3], scale_factor=8), tile=16)
    torch.testing.assert_close(tiled, F.interpolate(latents[:, :3], scale_factor=8))
