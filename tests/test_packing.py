"""Packing: layout, Omni-RoPE positions, and batch independence of the packed transformer."""

from __future__ import annotations

import torch

from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.packing import _sample_rope, pack_batch, patchify, rope_cos_sin, unpack_output, unpatchify
from tests.golden import run_transformer


def test_patchify_round_trip_and_order() -> None:
    latent = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    tokens = patchify(latent, 2)
    assert tokens.shape == (6, 8)
    # First token: patch (0, 0) with features ordered (p1, p2, c).
    assert tokens[0].tolist() == [0, 24, 1, 25, 6, 30, 7, 31]
    assert torch.equal(unpatchify(tokens, 4, 6, 2, 2), latent)


def test_positions_follow_omni_rope() -> None:
    """Text i -> (i,i,i); each image (shift,row,col); shift starts at the text length, += max(h,w) per ref."""
    axes = (2, 2, 2)
    text_mask = torch.tensor([[1, 1, 1, 0]])
    refs = [[torch.zeros(1, 4, 8), torch.zeros(1, 2, 2)]]  # 2x4 and 1x1 tokens
    packed = pack_batch(
        [torch.zeros(1, 4, 4)], torch.zeros(1), torch.zeros(1, 4, 3), text_mask, refs, patch_size=2, axes_dim=axes
    )
    expected = [[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 0, 0]]  # text, then the padded text slot
    expected += [[3, r, c] for r in range(2) for c in range(4)]  # ref 0: 2x4 tokens at shift 3
    expected += [[3 + 4, 0, 0]]  # ref 1: shift grew by max(2, 4)
    expected += [[0, 0, 0]] * 7  # ref slots are as long as the longest reference
    expected += [[3 + 4 + 1, r, c] for r in range(2) for c in range(2)]  # the noisy image
    cos, sin = rope_cos_sin(torch.tensor([expected]), axes)
    torch.testing.assert_close(packed.rope_cos, cos)
    torch.testing.assert_close(packed.rope_sin, sin)
    assert packed.ref_mask[0].sum(-1).tolist() == [8, 1]


def test_rope_tables_are_computed_once_per_layout() -> None:
    """A request's positions do not change from step to step: packing the same layout again reuses its tables,
    and a caller writing into its batch does not reach them."""
    _sample_rope.cache_clear()

    def pack(latents: list[torch.Tensor], mask: list[list[int]]) -> torch.Tensor:
        n = len(latents)
        refs = [[torch.zeros(16, 4, 4)]] * n
        feats = torch.zeros(n, len(mask[0]), 8)
        return pack_batch(
            latents, torch.zeros(n), feats, torch.tensor(mask), refs, patch_size=2, axes_dim=(2, 4, 2)
        ).rope_cos

    first = pack([torch.zeros(16, 4, 6)], [[1, 1, 0]])
    expected = first.clone()
    first.zero_()
    assert torch.equal(pack([torch.zeros(16, 4, 6)], [[1, 1, 0]]), expected)
    assert (_sample_rope.cache_info().misses, _sample_rope.cache_info().hits) == (1, 1)
    # Beside a larger image the sample's padding (its layout) changes: a new table, the same valid positions.
    pair = pack([torch.zeros(16, 4, 6), torch.zeros(16, 8, 8)], [[1, 1, 0], [1, 1, 1]])
    assert _sample_rope.cache_info().misses == 3
    assert torch.equal(pair[0, : expected.shape[1]], expected[0])


def test_batched_output_equals_each_sample_alone(golden_transformer: OmniGen2Transformer) -> None:
    """Packing pads; padding must not leak into any sample (this is what lets requests share a call)."""
    torch.manual_seed(0)
    cfg = golden_transformer.config
    latents = [torch.randn(16, 8, 8), torch.randn(16, 6, 10), torch.randn(16, 4, 4)]
    lens = [5, 9, 2]
    text = torch.randn(3, 9, cfg.text_feat_dim)
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lens])
    refs = [None, [torch.randn(16, 4, 6), torch.randn(16, 8, 4)], [torch.randn(16, 2, 2)]]
    timestep = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        batched = run_transformer(golden_transformer, latents, timestep, text, mask, refs)
        for b in range(3):
            n = lens[b]
            alone = run_transformer(
                golden_transformer,
                [latents[b]],
                timestep[b : b + 1],
                text[b : b + 1, :n],
                mask[b : b + 1, :n],
                [refs[b]],
            )[0]
            torch.testing.assert_close(batched[b], alone, rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(o).all() for o in batched)


def test_min_ref_slots_adds_a_masked_slot_without_changing_results(golden_transformer: OmniGen2Transformer) -> None:
    torch.manual_seed(1)
    cfg = golden_transformer.config
    text = torch.randn(1, 6, cfg.text_feat_dim)
    args = ([torch.randn(16, 8, 8)], torch.tensor([0.3]), text, torch.ones(1, 6), [None])
    plain = pack_batch(*args, patch_size=2, axes_dim=cfg.axes_dim_rope)
    padded = pack_batch(*args, patch_size=2, axes_dim=cfg.axes_dim_rope, min_ref_slots=1)
    assert plain.ref_tokens.shape[1] == 0 and padded.ref_tokens.shape[1:3] == (1, 1)
    with torch.no_grad():
        a = unpack_output(golden_transformer(**plain.as_inputs()), plain.latent_sizes, 2)[0]
        b = unpack_output(golden_transformer(**padded.as_inputs()), padded.latent_sizes, 2)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
