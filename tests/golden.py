"""Helpers to read the golden cases into the project's types."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.packing import pack_batch, unpack_output
from serving.pipeline.request import GenerationRequest


def request_from_case(case: dict[str, Any], golden: Path) -> GenerationRequest:
    return GenerationRequest(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        images=[Image.open(golden / name) for name in case["images"]],
        width=case["width"],
        height=case["height"],
        steps=case["steps"],
        text_guidance_scale=case["text_guidance_scale"],
        image_guidance_scale=case["image_guidance_scale"],
        cfg_range=tuple(case["cfg_range"]),
        seed=case["seed"],
        scheduler=case["scheduler"],
        num_images_per_prompt=case.get("num_images_per_prompt", 1),
        max_sequence_length=case.get("max_sequence_length"),
        cache=case.get("cache", "none"),
        teacache_threshold=case.get("teacache_rel_l1_thresh", 0.05),
    )


def transformer_case_inputs(case: dict[str, Any], golden: Path) -> dict[str, Any]:
    """Inputs of one golden transformer case as per-sample lists, plus the expected outputs."""
    data = np.load(golden / case["file"])
    batch = case["batch"]
    ref_shapes = case["ref_shapes"] or [None] * batch
    return {
        "latents": [torch.from_numpy(data[f"latent_{b}"]) for b in range(batch)],
        "timestep": torch.from_numpy(data["timestep"]),
        "text_feats": torch.from_numpy(data["text_hidden_states"]),
        "text_mask": torch.from_numpy(data["text_attention_mask"]),
        "refs": [
            [torch.from_numpy(data[f"ref_{b}_{j}"]) for j in range(len(shapes))] if shapes else None
            for b, shapes in enumerate(ref_shapes)
        ],
        "expected": [torch.from_numpy(data[f"output_{b}"]) for b in range(batch)],
    }


def relative_error(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def run_transformer(
    model: OmniGen2Transformer,
    latents: Sequence[torch.Tensor],
    timestep: torch.Tensor,
    text_feats: torch.Tensor,
    text_mask: torch.Tensor,
    refs: Sequence[Sequence[torch.Tensor] | None] | None = None,
) -> list[torch.Tensor]:
    """Per-sample (C, H, W) latents and reference latents in, per-sample velocities out (packing in between)."""
    packed = pack_batch(
        latents,
        timestep,
        text_feats,
        text_mask,
        refs if refs is not None else [None] * len(latents),
        patch_size=model.config.patch_size,
        axes_dim=model.config.axes_dim_rope,
    )
    with torch.no_grad():
        out = model(**packed.as_inputs())
    return unpack_output(out, packed.latent_sizes, model.config.patch_size)


def templated_tokens(checkpoint: Path, prompt: str, cut: int = 512) -> int:
    """A prompt's tokens as the model reads it (the system message and the prompt through the checkpoint's chat
    template), at most `cut`: the served default on the tiny checkpoint, whose text positions are 512."""
    from transformers import AutoTokenizer

    from serving.pipeline.prompts import SYSTEM_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "processor")
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    return min(len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]), cut)
