"""The four component graphs as modules with the served tensor contract (see docs/tensor_contract.md).

The same modules run eagerly (the PyTorch backend) and are what `serving/build/onnx_export.py` traces, so the
PyTorch and ONNX Runtime / TensorRT backends compute one function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from serving.model.transformer import OmniGen2Transformer


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a graph computes in: its weights' (float32 in the tensor contract, bf16 inside when loaded so)."""
    return next(module.parameters()).dtype


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL multimodal-RoPE positions for text-only input: (3, B, L), counting valid tokens only."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).masked_fill(attention_mask == 0, 1)
    return positions[None].expand(3, -1, -1)


class TextEncoderGraph(nn.Module):
    """input_ids, attention_mask -> the language model's last hidden states (after its final norm)."""

    def __init__(self, mllm: Any) -> None:  # Qwen2_5_VLForConditionalGeneration
        super().__init__()
        self.language_model = mllm.model.language_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=text_position_ids(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state


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
        return (mean - self.shift) * self.scale


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
        return self.decoder(z)


# The transformer graph is the transformer itself: it already takes the packed tensors.
TransformerGraph = OmniGen2Transformer
