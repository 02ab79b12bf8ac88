"""The four component graphs as modules with the served tensor contract (see docs/tensor_contract.md).

The same modules run eagerly (the PyTorch backend) and are what `serving/artifacts/onnx_export.py` traces, so the
PyTorch and ONNX Runtime / TensorRT backends compute one function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from serving.model.transformer import OmniGen2Transformer

if TYPE_CHECKING:  # transformers is imported where the weights load (checkpoint.load_mllm), not with the graphs
    from transformers import Qwen2_5_VLForConditionalGeneration


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a graph computes in: its weights' (float32 in the tensor contract, bf16 inside when loaded so)."""
    return next(module.parameters()).dtype


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL multimodal-RoPE positions for text-only input: (3, B, L), counting valid tokens only."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).masked_fill(attention_mask == 0, 1)
    return positions[None].expand(3, -1, -1)


class TextEncoderGraph(nn.Module):
    """input_ids, attention_mask -> the language model's last hidden states (after its final norm)."""

    def __init__(self, mllm: Qwen2_5_VLForConditionalGeneration) -> None:
        super().__init__()
        self.language_model = mllm.model.language_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=text_position_ids(attention_mask),
            use_cache=False,
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden


class VaeEncoderGraph(nn.Module):
    """Image in [-1, 1] (B, 3, H, W) -> posterior mode, shifted and scaled: (B, 16, H/8, W/8)."""

    def __init__(self, vae: Any) -> None:  # diffusers AutoencoderKL
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.shift = float(vae.config.shift_factor)
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(image.to(weight_dtype(self.encoder)))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean = moments[:, : moments.shape[1] // 2]  # the posterior mode of a diagonal Gaussian is its mean
        latents: torch.Tensor = (mean - self.shift) * self.scale
        return latents


class VaeDecoderGraph(nn.Module):
    """Normalised latents (B, 16, h, w) -> image (B, 3, 8h, 8w) in about [-1, 1]; unscaling happens inside."""

    def __init__(self, vae: Any) -> None:  # diffusers AutoencoderKL
        super().__init__()
        self.decoder = vae.decoder
        self.post_quant_conv = vae.post_quant_conv
        self.shift = float(vae.config.shift_factor)
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents / self.scale + self.shift).to(weight_dtype(self.decoder))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image: torch.Tensor = self.decoder(z)
        return image


class _TransformerStage(nn.Module):
    """One stage of the transformer as a graph of its own, on the transformer's weights (no copy)."""

    def __init__(self, transformer: OmniGen2Transformer) -> None:
        super().__init__()
        self.transformer = transformer


class TransformerEmbedGraph(_TransformerStage):
    """The transformer's inputs -> the joint sequence before the main layers (B, L, D) and the conditioning."""

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, temb = self.transformer.embed(
            img_tokens, img_mask, timestep, text_feats, text_mask, ref_tokens, ref_mask, rope_cos, rope_sin
        )
        return hidden.float(), temb.float()


class TransformerModulateGraph(_TransformerStage):
    """(hidden, temb) -> the first main layer's modulated input, which TeaCache compares from step to step."""

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        dtype = weight_dtype(self.transformer)
        return self.transformer.modulate(hidden.to(dtype), temb.to(dtype)).float()


class TransformerLayersGraph(_TransformerStage):
    """The main layers: (hidden, temb, joint_mask, rope_cos, rope_sin) -> hidden."""

    def forward(
        self,
        hidden: torch.Tensor,
        temb: torch.Tensor,
        joint_mask: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        dtype = weight_dtype(self.transformer)
        out = self.transformer.run_layers(hidden.to(dtype), temb.to(dtype), joint_mask, rope_cos, rope_sin)
        return out.float()


class TransformerHeadGraph(_TransformerStage):
    """(image tokens after the main layers (B, Li, D), timestep (B,)) -> velocity tokens (B, Li, P)."""

    def forward(self, hidden_img: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        model = self.transformer
        return model.head(hidden_img.to(weight_dtype(model)), model.time_embedding(timestep)).float()
