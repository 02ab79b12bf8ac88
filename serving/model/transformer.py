"""The OmniGen2 diffusion transformer, written for export: padded tensors in, padded tensors out.

Parameter names follow the official `transformer/` checkpoint exactly, so its safetensors load strictly.
The forward pass takes the packed layout of `serving.pipeline.packing` (masks and precomputed RoPE, no
Python lists), which lets the same module trace to ONNX and batch requests of different shapes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from serving.choices import ATTENTION_MODES, PADDED_ATTENTION
from serving.model.config import TransformerConfig
from serving.model.weights import load_weights, weight_files

# Diffusers' weights name (transformer and VAE): <stem>.safetensors, or shards listed by <stem>.safetensors.index.json
WEIGHTS_STEM = "diffusion_pytorch_model"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, L, H, D) queries/keys; adjacent feature pairs (2j, 2j+1) form one complex number."""
    pairs = x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# Added to the scores of padded keys. exp(-1e4) underflows to exactly 0 in fp32, bf16 and fp16, so valid rows
# match the reference; unlike -inf (or float32's minimum, which is -inf in fp16) an all-padding row (an empty
# reference slot) stays finite, so no NaN can reach valid rows through a 0 * NaN product. The folded mask holds
# it times sqrt(head_dim) (1.1e5 at 120), finite in fp32 and bf16 but not fp16: folded_key_mask refuses such a dtype.
MASK_BIAS = -1e4


def joint_mask(text_mask: torch.Tensor, ref_mask: torch.Tensor, img_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the valid tokens of the joint sequence [text | ref slots | image] from the packed masks."""
    return torch.cat([text_mask, ref_mask.flatten(1), img_mask], dim=1)


def key_mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool key mask -> additive (B, 1, 1, L) bias."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, MASK_BIAS)
    return bias[:, None, None, :]


class FoldedKeyMask(NamedTuple):
    """A (B, L) key mask folded into the query-key product (`--padded-attention folded`): every query and key gets
    `width` more channels (zeros for values), the query's first one 1 and the key's the bias over the softmax scale
    (MASK_BIAS / scale at padded keys, 0 at valid ones), so q.k * scale carries exactly the bias, which SDPA then
    needs no mask for: flash and cuDNN take the call, with the grouped heads. `width` makes the head a multiple of
    8, as flash needs (120 -> 128, flash's own template size for 120; cuDNN's cost for it is not checked). Built
    once per call (`key_mask`)."""

    key: torch.Tensor  # (B, 1, L, width)
    query: torch.Tensor  # (width,): [1, 0, ...]


def fold_width(head_dim: int) -> int:
    """The channels a FoldedKeyMask adds to heads of `head_dim`: at least one, up to the next multiple of 8. A plain
    int from the model's head size, never a size read from the mask: under torch.compile(dynamic=True) that would
    be symbolic, and SDPA would see heads of `s + head_dim` channels in the compiled blocks."""
    return 8 - head_dim % 8


def folded_key_mask(mask: torch.Tensor, head_dim: int, dtype: torch.dtype) -> FoldedKeyMask:
    """(B, L) bool key mask -> its FoldedKeyMask for heads of `head_dim`."""
    width = fold_width(head_dim)
    if abs(MASK_BIAS) * head_dim**0.5 > torch.finfo(dtype).max:  # fp16: not offered (serving/choices.py)
        raise ValueError(f"a folded key mask for heads of {head_dim} overflows {dtype}: padded keys would be -inf")
    bias = key_mask_bias(mask, torch.float32) * head_dim**0.5  # over the scale, head_dim ** -0.5
    key = F.pad(bias.transpose(2, 3).to(dtype), (0, width - 1))
    query = F.pad(torch.ones(1, dtype=dtype, device=mask.device), (0, width - 1))
    return FoldedKeyMask(key, query)


# How attention skips padded keys (ATTENTION_MODES; serving/runtime/fast_path.py chooses): `dense` adds a
# (B, 1, 1, L) bias and repeats the key/value heads, as the reference and the exported graphs do; `sdpa` gives the
# kernel no mask at all when no key of the call is padded (so flash / cuDNN kernels qualify) and the grouped heads as
# they are, and folds the mask into the heads where keys are padded (FoldedKeyMask) or adds the bias
# (PADDED_ATTENTION); `flex` hands padded calls to FlexAttention as a block mask, which skips the padded blocks
# instead of adding -1e4 to them.
KeyMask = torch.Tensor | BlockMask | FoldedKeyMask | None  # a bias, a block mask, a folded mask, or nothing
# torch's name for each of serving.choices.SDPA_KERNELS (`--sdpa-kernels`)
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


# Tokens per block of a FlexAttention block mask (flex_attention's default). A compiled block is a graph of its own
# for a mask of one block and one of several (dynamo specializes a size of 1), which the warm-up must build both of.
FLEX_BLOCK = 128


def flex_key_mask(mask: torch.Tensor) -> BlockMask:
    """(B, L) bool key mask -> a FlexAttention block mask for self-attention over those L tokens."""
    batch, length = mask.shape
    mask = unviewed(mask)  # captured by the compiled blocks, which guard on its strides

    def valid_key(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return mask[b, kv]

    return create_block_mask(valid_key, batch, None, length, length, device=mask.device, BLOCK_SIZE=FLEX_BLOCK)


def unviewed(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` that is no view, with the strides of a new tensor of its shape (`contiguous()` may keep a view,
    and strides other than these where a dimension has size 1). The refiner blocks take their inputs so: a compiled
    block guards on its inputs' strides and on whether they are views (and of what base), so a slice here and a
    copy there would each be a graph of its own (serving/runtime/fast_path.py). Copies change no value, and cost
    little beside a block (once per refiner, not per main layer)."""
    return x.clone(memory_format=torch.contiguous_format)


class Attention(nn.Module):
    """Grouped-query self-attention with RMS-normed q/k and RoPE (names as diffusers' `Attention`)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.to_q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(heads * self.head_dim, dim, bias=False)])
        self.grouped_kernel = False  # unmasked calls give SDPA the shared key/value heads (not in exported graphs)
        # The SDPA kernels an unmasked call may use, tried in this order (empty: torch's own choice and order)
        self.sdpa_backends: list[SDPBackend] = []

    def forward(self, x: torch.Tensor, mask: KeyMask, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.to_q(x).view(b, n, self.heads, self.head_dim))
        k = self.norm_k(self.to_k(x).view(b, n, self.kv_heads, self.head_dim))
        v = self.to_v(x).view(b, n, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scale = self.head_dim**-0.5
        if isinstance(mask, BlockMask):
            out = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
        elif isinstance(mask, FoldedKeyMask):
            width = fold_width(self.head_dim)
            q = torch.cat([q, mask.query.expand(b, self.heads, n, width)], dim=-1)
            k = torch.cat([k, mask.key.expand(b, self.kv_heads, n, width)], dim=-1)
            out = self.unmasked(q, k, F.pad(v, (0, width)), scale)[..., : self.head_dim]
        elif self.grouped_kernel and mask is None:
            out = self.unmasked(q, k, v, scale)
        else:
            # Query head h reads key/value head h // (heads / kv_heads), as the reference's repeat_interleave.
            groups = self.heads // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        assert isinstance(out, torch.Tensor)
        projected: torch.Tensor = self.to_out[0](out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
        return projected

    def unmasked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """SDPA without a mask, over the grouped key/value heads, with the kernels `sdpa_backends` allows."""
        # Flash and cuDNN read the shared heads themselves. With a bias the heads are repeated instead: the
        # memory-efficient kernel, the one that takes a bias, may not take grouped heads, and SDPA would then
        # fall back to the math kernel, which materialises every score in float32.
        if not self.sdpa_backends:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        # Traced by torch.compile, which then builds the block with the kernel this order picks
        with sdpa_kernel(self.sdpa_backends, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


class FeedForward(nn.Module):
    """SwiGLU: linear_2(silu(linear_1 x) * linear_3 x), inner width rounded up to `multiple_of`."""

    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> None:
        super().__init__()
        inner = 4 * dim
        if ffn_dim_multiplier is not None:
            inner = int(ffn_dim_multiplier * inner)
        inner = multiple_of * math.ceil(inner / multiple_of)
        self.linear_1 = nn.Linear(dim, inner, bias=False)
        self.linear_2 = nn.Linear(inner, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear_2(F.silu(self.linear_1(x)) * self.linear_3(x))
        return out


class RMSNormZero(nn.Module):
    """Adaptive RMSNorm: the timestep embedding gives (scale_msa, gate_msa, scale_mlp, gate_mlp)."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 4 * dim, bias=True)
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(4, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class TransformerBlock(nn.Module):
    """Pre/post-normed attention + SwiGLU block; `modulated` blocks are conditioned on the timestep."""

    def __init__(self, config: TransformerConfig, modulated: bool) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.norm_eps
        self.modulated = modulated
        self.attn = Attention(dim, config.num_attention_heads, config.num_kv_heads)
        self.feed_forward = FeedForward(dim, config.multiple_of, config.ffn_dim_multiplier)
        self.norm1: nn.Module = RMSNormZero(dim, config.cond_dim, eps) if modulated else nn.RMSNorm(dim, eps=eps)
        self.norm2 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: KeyMask,
        cos: torch.Tensor,
        sin: torch.Tensor,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out: torch.Tensor  # the submodules' calls are Any to the checker
        if not self.modulated:
            x = x + self.norm2(self.attn(self.norm1(x), mask, cos, sin))
            out = x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
            return out
        assert temb is not None
        normed, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
        x = x + gate_msa.unsqueeze(1).tanh() * self.norm2(self.attn(normed, mask, cos, sin))
        ff = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
        out = x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(ff)
        return out


class TimestepEmbedder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear_2(F.silu(self.linear_1(x)))
        return out


class TimeCaptionEmbedding(nn.Module):
    """Sinusoidal timestep features (cos first) -> MLP; text features -> RMSNorm -> linear (used by the
    transformer's `time_embedding` and `embed`)."""

    frequency_dim = 256

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.timestep_scale = config.timestep_scale
        self.timestep_embedder = TimestepEmbedder(self.frequency_dim, config.cond_dim)
        self.caption_embedder = nn.Sequential(
            nn.RMSNorm(config.text_feat_dim, eps=config.norm_eps),
            nn.Linear(config.text_feat_dim, config.hidden_size, bias=True),
        )

    def timestep_features(self, timestep: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=timestep.device)
        freqs = torch.exp(-math.log(10000.0) * steps / half)
        angles = (timestep.float()[:, None] * freqs[None, :]) * self.timestep_scale
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class OutputNorm(nn.Module):
    """LayerNorm (no affine) scaled by the timestep embedding, then the patch projection."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cond_dim, dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear_2 = nn.Linear(dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb))
        out: torch.Tensor = self.linear_2(self.norm(x) * (1 + scale)[:, None, :])
        return out


class OmniGen2Transformer(nn.Module):
    """OmniGen2 transformer over packed inputs; see `serving.pipeline.packing` for the layout."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        dim = config.hidden_size
        self.x_embedder = nn.Linear(config.patch_dim, dim)
        self.ref_image_patch_embedder = nn.Linear(config.patch_dim, dim)
        self.time_caption_embed = TimeCaptionEmbedding(config)
        n_ref = config.num_refiner_layers
        self.noise_refiner = nn.ModuleList([TransformerBlock(config, modulated=True) for _ in range(n_ref)])
        self.ref_image_refiner = nn.ModuleList([TransformerBlock(config, modulated=True) for _ in range(n_ref)])
        self.context_refiner = nn.ModuleList([TransformerBlock(config, modulated=False) for _ in range(n_ref)])
        self.layers = nn.ModuleList([TransformerBlock(config, modulated=True) for _ in range(config.num_layers)])
        self.norm_out = OutputNorm(dim, config.cond_dim, config.patch_size**2 * config.output_channels)
        # One learned embedding per input-image index: the model supports at most 5 reference images.
        self.image_index_embedding = nn.Parameter(torch.zeros(5, dim))
        self.attention = "dense"
        self.padded_attention = "bias"

    def blocks(self) -> list[TransformerBlock]:
        """Every attention block: refiners and main layers (what the fast path compiles, region by region)."""
        lists = (self.context_refiner, self.noise_refiner, self.ref_image_refiner, self.layers)
        return [block for blocks in lists for block in blocks if isinstance(block, TransformerBlock)]

    def set_attention(self, mode: str) -> None:
        """One of ATTENTION_MODES; `dense` (the default) is the only one the ONNX export traces."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r} is not one of {', '.join(ATTENTION_MODES)}")
        self.attention = mode
        for block in self.blocks():
            block.attn.grouped_kernel = mode != "dense"

    def set_sdpa_kernels(self, kernels: tuple[str, ...]) -> None:
        """Limit the unmasked attention calls to these kernels (SDPA_BACKENDS' names), tried in this order (torch's
        `sdpa_kernel` with `set_priority`); () leaves SDPA its own choice. Masked calls keep theirs."""
        for block in self.blocks():
            block.attn.sdpa_backends = [SDPA_BACKENDS[name] for name in kernels]

    def set_padded_attention(self, mode: str) -> None:
        """One of PADDED_ATTENTION: how `sdpa` attention takes calls with padded keys (`bias`, the default, in the
        other modes and the exported graphs)."""
        if mode not in PADDED_ATTENTION:
            raise ValueError(f"padded attention {mode!r} is not one of {', '.join(PADDED_ATTENTION)}")
        self.padded_attention = mode

    def key_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> KeyMask:
        """What attention takes for a (B, L) key mask; None (no key padded) only outside the dense mode. Built once
        per stage call, so the main layers share one."""
        if mask is None:
            return None
        mask = mask.bool()
        if self.attention == "flex":
            return flex_key_mask(mask)
        if self.attention == "sdpa" and self.padded_attention == "folded":
            return folded_key_mask(mask, self.config.hidden_size // self.config.num_attention_heads, dtype)
        return key_mask_bias(mask, dtype)

    def forward(
        self,
        img_tokens: torch.Tensor,
        img_mask: torch.Tensor,
        timestep: torch.Tensor,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        ref_tokens: torch.Tensor,
        ref_mask: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity tokens (B, Li, P) for the packed batch; rows past each sample's image length are padding.

        Activations take the weights' dtype (float32 in, bf16 inside for bf16 weights); the timestep and the
        RoPE tables stay float32, as the reference computes them. The three stages are also callable one by
        one: step caching (serving/pipeline/step_cache.py) runs the main layers on only some samples.
        """
        hidden, temb = self.embed(
            img_tokens, img_mask, timestep, text_feats, text_mask, ref_tokens, ref_mask, rope_cos, rope_sin
        )
        hidden = self.run_layers(hidden, temb, joint_mask(text_mask, ref_mask, img_mask), rope_cos, rope_sin)
        return self.head(hidden[:, hidden.shape[1] - img_tokens.shape[1] :], temb)

    def time_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, cond_dim) conditioning, in the weights' dtype."""
        embedder = self.time_caption_embed
        dtype = self.x_embedder.weight.dtype
        temb: torch.Tensor = embedder.timestep_embedder(embedder.timestep_features(timestep).to(dtype))
        return temb

    def embed(
        self,
        img_tokens: torch.Tensor,
        img_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor | None,
        ref_tokens: torch.Tensor,
        ref_mask: torch.Tensor | None,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and refiners: the joint sequence (B, L, D) the main layers take, and the conditioning.
        A mask may be None where none of its tokens is padding (see `key_mask`)."""
        dtype = self.x_embedder.weight.dtype
        img_tokens, text_feats, ref_tokens = (t.to(dtype) for t in (img_tokens, text_feats, ref_tokens))
        batch, slots, ref_len, _ = ref_tokens.shape
        text_len = text_feats.shape[1]

        temb = self.time_embedding(timestep)
        text = unviewed(self.time_caption_embed.caption_embedder(text_feats))
        ref_start, img_start = text_len, text_len + slots * ref_len
        text_cos, text_sin = unviewed(rope_cos[:, :ref_start]), unviewed(rope_sin[:, :ref_start])
        img_cos, img_sin = unviewed(rope_cos[:, img_start:]), unviewed(rope_sin[:, img_start:])

        text_bias = self.key_mask(text_mask, dtype)
        for block in self.context_refiner:
            text = block(text, text_bias, text_cos, text_sin)

        img = unviewed(self.x_embedder(img_tokens))
        img_bias = self.key_mask(img_mask, dtype)
        for block in self.noise_refiner:
            img = block(img, img_bias, img_cos, img_sin, temb)

        if slots * ref_len == 0:  # no reference at all (a trimmed text-to-image call): nothing to refine
            return torch.cat([text, img], dim=1), temb
        # Each reference image is refined on its own: fold the slots into the batch axis.
        refs = self.ref_image_patch_embedder(ref_tokens) + self.image_index_embedding[:slots, None, :]
        dim, half = self.config.hidden_size, rope_cos.shape[-1]
        refs = unviewed(refs.reshape(batch * slots, ref_len, dim))
        ref_flat_mask = None if ref_mask is None else ref_mask.reshape(batch * slots, ref_len)
        ref_cos = unviewed(rope_cos[:, ref_start:img_start].reshape(batch * slots, ref_len, half))
        ref_sin = unviewed(rope_sin[:, ref_start:img_start].reshape(batch * slots, ref_len, half))
        # For one row with several slots this reshape is a view with stride 0: `unviewed` makes it a copy
        ref_temb = unviewed(temb[:, None].expand(batch, slots, temb.shape[-1]).reshape(batch * slots, temb.shape[-1]))
        ref_bias = self.key_mask(ref_flat_mask, dtype)
        for block in self.ref_image_refiner:
            refs = block(refs, ref_bias, ref_cos, ref_sin, ref_temb)
        refs = refs.reshape(batch, slots * ref_len, dim)
        return torch.cat([text, refs, img], dim=1), temb

    def modulate(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The first main layer's modulated input: what TeaCache watches to decide whether a step may be skipped."""
        norm = self.layers[0].norm1
        assert isinstance(norm, RMSNormZero)
        modulated: torch.Tensor = norm(hidden, temb)[0]
        return modulated

    def run_layers(
        self,
        hidden: torch.Tensor,
        temb: torch.Tensor,
        joint_mask: torch.Tensor | None,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        """The main (joint) layers over [text | refs | image]; `joint_mask` (B, L) marks the valid tokens (None:
        all are)."""
        joint_bias = self.key_mask(joint_mask, hidden.dtype)
        for block in self.layers:
            hidden = block(hidden, joint_bias, rope_cos, rope_sin, temb)
        return hidden

    def head(self, hidden_img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Output norm and patch projection of the image tokens (B, Li, D) -> velocity tokens (B, Li, P)."""
        velocity: torch.Tensor = self.norm_out(hidden_img, temb)
        return velocity

    @classmethod
    def on_meta(cls, directory: Path | str) -> OmniGen2Transformer:
        """The architecture `directory/config.json` describes, with no storage: for shape checks and loading."""
        config = TransformerConfig.from_file(Path(directory) / "config.json")
        with torch.device("meta"):
            return cls(config)

    @classmethod
    def from_pretrained(
        cls, directory: Path | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> OmniGen2Transformer:
        """Load `transformer/` of the official layout (config.json + one safetensors file or index-listed shards)
        straight into `dtype` on `device`: built on the meta device, so no float32 copy ever exists."""
        model = cls.on_meta(directory)
        load_weights(model, weight_files(Path(directory), WEIGHTS_STEM), dtype, device)
        return model.eval()
