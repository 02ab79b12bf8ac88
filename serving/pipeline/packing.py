"""Pack variable-size transformer inputs into padded, static-rank tensors, and unpack the output.

Layout of one packed sample along the joint sequence (length L = Lt + R * Lr + Li):

    [ text (Lt) | ref slot 0 (Lr) | ... | ref slot R-1 (Lr) | noisy image (Li) ]

Each region is right-padded and carries its own boolean mask; attention ignores padded keys, so the
position of padding inside the sequence does not change any valid token's result. RoPE angles are
precomputed here ("Omni-RoPE": text token i -> (i, i, i); image j -> (shift_j, row, col), where shift
starts at the text length and grows by max(h, w) tokens per reference image) so that the transformer
graph sees tensors only. The eager pipeline and the Triton BLS both build their batches with this module.

A sample's angles depend only on its layout (text length, reference and image grids, the batch's padding), which
stays the same from step to step of a request, so each layout's tables are computed once and reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

ROPE_THETA = 10000.0


def patchify(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) latent -> (H/p * W/p, p * p * C) tokens, row-major over patches."""
    c, h, w = latent.shape
    p = patch_size
    x = latent.reshape(c, h // p, p, w // p, p)
    return x.permute(1, 3, 2, 4, 0).reshape((h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify`: (h*w, p*p*C) tokens of an (H, W) latent -> (C, H, W)."""
    p = patch_size
    h, w = height // p, width // p
    x = tokens[: h * w].reshape(h, w, p, p, channels)
    return x.permute(4, 0, 2, 1, 3).reshape(channels, height, width)


def rope_inv_freqs(axes_dim: Sequence[int], theta: float = ROPE_THETA) -> list[torch.Tensor]:
    """Per-axis inverse frequencies 1 / theta^(2j/d), in float64 like the reference tables."""
    return [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d) for d in axes_dim]


def rope_cos_sin(position_ids: torch.Tensor, axes_dim: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, 3) integer positions -> cos, sin of shape (B, L, head_dim / 2), float32."""
    positions = position_ids.to(torch.float64)
    angles = torch.cat([positions[..., axis, None] * f for axis, f in enumerate(rope_inv_freqs(axes_dim))], dim=-1)
    return angles.cos().float(), angles.sin().float()


@dataclass
class PackedBatch:
    """Inputs of one transformer call, named as in the exported graph (see docs/tensor_contract.md)."""

    img_tokens: torch.Tensor  # (B, Li, P) float
    img_mask: torch.Tensor  # (B, Li) bool
    timestep: torch.Tensor  # (B,) float
    text_feats: torch.Tensor  # (B, Lt, Dt) float
    text_mask: torch.Tensor  # (B, Lt) bool
    ref_tokens: torch.Tensor  # (B, R, Lr, P) float
    ref_mask: torch.Tensor  # (B, R, Lr) bool
    rope_cos: torch.Tensor  # (B, L, head_dim / 2) float
    rope_sin: torch.Tensor  # (B, L, head_dim / 2) float
    latent_sizes: list[tuple[int, int]]  # (H, W) of each sample's latent, to unpack the output

    def as_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "img_tokens": self.img_tokens,
            "img_mask": self.img_mask,
            "timestep": self.timestep,
            "text_feats": self.text_feats,
            "text_mask": self.text_mask,
            "ref_tokens": self.ref_tokens,
            "ref_mask": self.ref_mask,
            "rope_cos": self.rope_cos,
            "rope_sin": self.rope_sin,
        }


def pack_batch(
    latents: Sequence[torch.Tensor],
    timestep: torch.Tensor,
    text_feats: torch.Tensor,
    text_mask: torch.Tensor,
    refs: Sequence[Sequence[torch.Tensor] | None],
    *,
    patch_size: int,
    axes_dim: Sequence[int],
    min_ref_slots: int = 0,
) -> PackedBatch:
    """Pack B samples. `latents[b]` is (C, H, W); `refs[b]` is that sample's reference latents or None.

    `min_ref_slots` keeps at least that many (fully masked) reference slots, for graphs that cannot take
    a zero-size dimension.
    """
    batch = len(latents)
    if not (len(refs) == batch == text_feats.shape[0] == text_mask.shape[0] == timestep.shape[0]):
        raise ValueError("latents, refs, text_feats, text_mask and timestep must have the same batch size")
    p = patch_size
    dtype = latents[0].dtype
    img_tok = [patchify(x, p) for x in latents]
    ref_tok = [[patchify(r, p) for r in (rs or [])] for rs in refs]

    img_len = max(t.shape[0] for t in img_tok)
    slots = max([len(r) for r in ref_tok] + [min_ref_slots])
    ref_len = max([t.shape[0] for rs in ref_tok for t in rs], default=1 if slots else 0)
    patch_dim = img_tok[0].shape[1]

    img_tokens = torch.zeros(batch, img_len, patch_dim, dtype=dtype)
    img_mask = torch.zeros(batch, img_len, dtype=torch.bool)
    ref_tokens = torch.zeros(batch, slots, ref_len, patch_dim, dtype=dtype)
    ref_mask = torch.zeros(batch, slots, ref_len, dtype=torch.bool)

    mask = text_mask.bool()
    tables = []
    for b in range(batch):
        for r, tokens in enumerate(ref_tok[b]):
            ref_tokens[b, r, : tokens.shape[0]] = tokens
            ref_mask[b, r, : tokens.shape[0]] = True
        img_tokens[b, : img_tok[b].shape[0]] = img_tok[b]
        img_mask[b, : img_tok[b].shape[0]] = True
        layout = _Layout(
            text_mask=tuple(mask[b].tolist()),
            ref_grids=tuple((r.shape[1] // p, r.shape[2] // p) for r in refs[b] or []),
            ref_len=ref_len,
            slots=slots,
            image_grid=(latents[b].shape[1] // p, latents[b].shape[2] // p),
            img_len=img_len,
            axes_dim=tuple(axes_dim),
        )
        tables.append(_sample_rope(layout))

    cos, sin = (torch.stack([t[i] for t in tables]) for i in (0, 1))
    return PackedBatch(
        img_tokens=img_tokens,
        img_mask=img_mask,
        timestep=timestep.to(dtype),
        text_feats=text_feats.to(dtype),
        text_mask=mask,
        ref_tokens=ref_tokens,
        ref_mask=ref_mask,
        rope_cos=cos.to(dtype),
        rope_sin=sin.to(dtype),
        latent_sizes=[(int(x.shape[1]), int(x.shape[2])) for x in latents],
    )


@dataclass(frozen=True)
class _Layout:
    """Everything a sample's RoPE positions depend on: its own token grids and the batch's padded lengths."""

    text_mask: tuple[bool, ...]
    ref_grids: tuple[tuple[int, int], ...]
    ref_len: int
    slots: int
    image_grid: tuple[int, int]
    img_len: int
    axes_dim: tuple[int, ...]


# Enough for the layouts of a few steps of every active request and branch; an entry of the full model at
# 1024x1024 with one reference is about 4 MB.
@lru_cache(maxsize=64)
def _sample_rope(layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim / 2) of one sample; padding gets position 0 like the reference's padded tensors."""
    text_len = len(layout.text_mask)
    positions = torch.zeros(text_len + layout.slots * layout.ref_len + layout.img_len, 3, dtype=torch.int64)
    # Text positions count valid tokens only, so padding anywhere keeps the reference numbering.
    mask = torch.tensor(layout.text_mask, dtype=torch.long)
    positions[:text_len] = ((torch.cumsum(mask, 0) - 1) * mask).unsqueeze(-1)
    shift = int(mask.sum())
    for r, (h, w) in enumerate(layout.ref_grids):
        start = text_len + r * layout.ref_len
        positions[start : start + h * w] = _grid_positions(shift, h, w)
        shift += max(h, w)
    h, w = layout.image_grid
    start = text_len + layout.slots * layout.ref_len
    positions[start : start + h * w] = _grid_positions(shift, h, w)
    return rope_cos_sin(positions, layout.axes_dim)


def _grid_positions(shift: int, h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([torch.full_like(rows, shift), rows, cols], dim=-1)


def unpack_output(out: torch.Tensor, latent_sizes: Sequence[tuple[int, int]], patch_size: int) -> list[torch.Tensor]:
    """(B, Li, P) velocity tokens -> per-sample (C, H, W) latents."""
    channels = out.shape[-1] // (patch_size * patch_size)
    return [unpatchify(out[b], h, w, patch_size, channels) for b, (h, w) in enumerate(latent_sizes)]
