"""The cost model: what a request asks for, computed before any work (serving/pipeline/cost.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from serving.pipeline.chat import ChatEncoder
from serving.pipeline.chat_request import ChatMessage, ChatPart, ChatRequest
from serving.pipeline.cost import chat_cost, generation_cost
from serving.pipeline.request import GenerationRequest


def test_tokens_follow_sizes_branches_and_steps() -> None:
    cost = generation_cost(GenerationRequest(prompt="a cat", width=256, height=256, steps=10), [], False)
    image, prompt, negative = 16 * 16, 5 + 64, 0 + 64
    assert (cost.image_tokens, cost.text_tokens, cost.sample_tokens) == (image, prompt, prompt + image)
    assert cost.step_tokens == (prompt + image) + (negative + image)  # cond + uncond
    assert cost.total_tokens == 10 * cost.step_tokens
    assert cost.output_bytes == int(256 * 256 * 3 * 1.01)


def test_references_add_a_branch_and_their_tokens_outside_cfg_range_they_do_not() -> None:
    refs = [(512, 512), (2048, 1024)]  # fitted to 1024 px sides: 32x32 and 64x32 patches
    request = GenerationRequest(prompt="x", width=64, height=64, steps=4, num_images_per_prompt=2)
    cost = generation_cost(request, refs, return_latents=True)
    assert cost.reference_tokens == 32 * 32 + 64 * 32 and cost.input_pixels == 512 * 512 + 2048 * 1024
    cond, ref, uncond = 65 + cost.reference_tokens + 16, 64 + cost.reference_tokens + 16, 64 + 16
    assert cost.step_tokens == 2 * (cond + ref + uncond)
    assert cost.output_bytes == int(2 * 64 * 64 * 3 * 1.01) + 2 * 16 * 8 * 8 * 4
    late = GenerationRequest(prompt="x", width=64, height=64, steps=4, cfg_range=(0.5, 1.0))
    assert generation_cost(late, refs, False).total_tokens == 2 * cond + 2 * (cond + ref + uncond)


def test_text_is_bounded_by_bytes_and_by_the_sequence_length() -> None:
    emoji = GenerationRequest(prompt="\N{GRINNING FACE}" * 100, width=16, height=16)
    assert generation_cost(emoji, [], False).text_tokens == 400 + 64
    cut = GenerationRequest(prompt="\N{GRINNING FACE}" * 8192, width=16, height=16, max_sequence_length=300)
    assert generation_cost(cut, [], False).text_tokens == 300


@pytest.mark.parametrize(
    ("texts", "sizes", "max_pixels"),
    [
        (["What is in the picture?"], [(64, 64)], 50176),
        (["\N{GRINNING FACE}" * 50, "and this?"], [(300, 90), (17, 1000)], 50176),
        (["Describe"], [(1000, 1000), (224, 224)], 12544),
        (["Only text, " * 40], [], 50176),
    ],
)
def test_chat_cost_bounds_the_tokens_the_model_sees(
    tiny_checkpoint: Path, texts: list[str], sizes: list[tuple[int, int]], max_pixels: int
) -> None:
    """The front end counts without a tokenizer; its bound must hold for what the `mllm` encoder makes."""
    encoder = ChatEncoder.from_dir(tiny_checkpoint / "processor")
    parts = [ChatPart(text=t) for t in texts] + [ChatPart(image=i) for i in range(len(sizes))]
    images = [Image.new("RGB", (w, h), 128) for h, w in sizes]
    chat = ChatRequest([ChatMessage("user", parts)], images=images, max_new_tokens=7, max_pixels=max_pixels)
    seen = encoder.encode(chat).input_ids.shape[1]
    cost = chat_cost(texts, 1, sizes, max_pixels, 7, max_prompt_tokens=8192)
    assert seen <= cost.prompt_tokens < seen + 100 + sum(len(t.encode()) for t in texts)
    assert cost.total_tokens == cost.prompt_tokens + 7


def test_chat_cost_is_capped_by_the_prompt_token_limit() -> None:
    """The model refuses a longer prompt before it runs, so no answer holds more than the limit + new tokens."""
    assert chat_cost(["\N{GRINNING FACE}" * 8192], 1, [], 50176, 2048, max_prompt_tokens=8192).total_tokens == 10240
