"""The reference for visual understanding: transformers' own `generate`, on inputs built here from the processor
files with no help from the project's encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

from serving.pipeline.chat_request import ChatRequest


def transformers_generate(checkpoint: Path, request: ChatRequest) -> list[int]:
    """transformers' own generate on inputs built here from the processor files, without the project's encoder."""
    processor = checkpoint / "processor"
    tokenizer = AutoTokenizer.from_pretrained(processor)
    # The processor exactly as the checkpoint configures it: requests in the parity tests leave max_pixels at a
    # default above the checkpoint's own bound.
    vision = Qwen2VLImageProcessor.from_pretrained(processor)(images=request.images, return_tensors="pt")
    conversation = [
        {
            "role": m.role,
            "content": [
                {"type": "image"} if p.image is not None else {"type": "text", "text": p.text} for p in m.parts
            ],
        }
        for m in request.messages
    ]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    for grid in vision["image_grid_thw"]:  # each image's placeholder becomes one token per 2x2 merged patch
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
    ids = tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint / "mllm").eval()
    sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
    torch.manual_seed(request.seed)
    out = model.generate(
        **ids,
        pixel_values=vision["pixel_values"],
        image_grid_thw=vision["image_grid_thw"],
        max_new_tokens=request.max_new_tokens,
        **(sampling if request.temperature > 0 else {"do_sample": False}),
    )
    return [int(t) for t in out[0, ids["input_ids"].shape[1] :]]
