"""Load the parts of an OmniGen2 checkpoint in the official layout, unchanged.

    model_index.json  transformer/  vae/  mllm/  processor/  [scheduler/]

The VAE is diffusers' `AutoencoderKL`, the MLLM is transformers' `Qwen2_5_VLForConditionalGeneration`,
the tokenizer and chat template come from `processor/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration

from serving.errors import CheckpointError
from serving.model.transformer import OmniGen2Transformer

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."
REQUIRED_FILES = (
    "model_index.json",
    "transformer/config.json",
    "vae/config.json",
    "mllm/config.json",
    "processor/tokenizer_config.json",
)


def check_layout(checkpoint: Path) -> None:
    """Fail with the path of the first missing part, before any heavy loading starts."""
    if not checkpoint.is_dir():
        raise CheckpointError(str(checkpoint), "checkpoint folder not found")
    for relative in REQUIRED_FILES:
        if not (checkpoint / relative).is_file():
            raise CheckpointError(str(checkpoint / relative), "file not found (official OmniGen2 layout expected)")


class TextEncoder:
    """Prompt -> chat template -> tokens -> the MLLM's last hidden states (padding 'longest')."""

    def __init__(
        self,
        mllm: Qwen2_5_VLForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
    ) -> None:
        self.mllm = mllm
        self.tokenizer = tokenizer
        self.max_length = max_length

    def apply_template(self, prompt: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert isinstance(text, str)
        return text

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the templated prompts, right-padded to the longest."""
        batch = self.tokenizer(
            [self.apply_template(p) for p in prompts],
            padding="longest",
            max_length=self.max_length,
            truncation=self.max_length is not None,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = self.tokenize(prompts)
        return self.encode_ids(input_ids, mask), mask

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.mllm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-1]


class Vae:
    """AutoencoderKL with the OmniGen2 latent normalisation (z - shift) * scale; encodes the posterior mode."""

    def __init__(self, model: Any) -> None:  # AutoencoderKL: diffusers sets its attributes dynamically
        self.model = model
        self.scale = float(self.model.config.scaling_factor)
        self.shift = float(self.model.config.shift_factor)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8) normalised latents."""
        mode = self.model.encode(image).latent_dist.mode()
        return (mode - self.shift) * self.scale

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the VAE's own latent space (what its decoder takes)."""
        return latents / self.scale + self.shift

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> (B, 3, 8h, 8w) image in about [-1, 1]."""
        return self.model.decode(self.unscale(latents), return_dict=False)[0]


@dataclass
class Components:
    transformer: OmniGen2Transformer
    vae: Vae
    text_encoder: TextEncoder


def load_components(checkpoint: Path | str, dtype: torch.dtype = torch.float32) -> Components:
    checkpoint = Path(checkpoint)
    check_layout(checkpoint)
    transformer = OmniGen2Transformer.from_pretrained(checkpoint / "transformer", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(checkpoint / "vae", torch_dtype=dtype).eval()
    mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint / "mllm", dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "processor")
    return Components(transformer=transformer, vae=Vae(vae), text_encoder=TextEncoder(mllm, tokenizer))
