"""What a generation will cost, computed from the request and its images' headers before any work runs.

Tokens are transformer tokens (a 16x16-pixel patch of an image, or one text token) and are counted per sample:
a step carries each active CFG branch of each of the `num_images_per_prompt` images. Text is bounded from above,
not tokenized: a byte-level BPE (Qwen2.5's) never makes more tokens than the text has UTF-8 bytes, and prompts
are cut at max_sequence_length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from omnigen2.limits import MIN_VISION_PIXELS

from serving.pipeline.guidance import Branch, step_guidance
from serving.pipeline.images import SIZE_MULTIPLE, fit_size, generation_size
from serving.pipeline.request import DEFAULT_MAX_SEQUENCE_LENGTH, GenerationRequest

LATENT_CHANNELS = 16
VAE_SCALE = 8
# An 8-bit PNG of noise is slightly larger than its pixels (one filter byte a row, zlib's stored blocks).
ENCODING_SLACK = 1.01
CHAT_TEMPLATE_TOKENS = 64  # the system message and the template's markers around a prompt


@dataclass(frozen=True)
class GenerationCost:
    output_bytes: int  # the response: uint8 images at output size (encoded), plus latents when asked for
    output_pixels: int  # n x output height x width: what the pipeline's output buffers and the response scale with
    input_pixels: int  # decoded pixels of the input images, as their headers state
    text_tokens: int  # the longer of the prompt and the negative prompt, at most
    image_tokens: int  # the generated image's tokens in one sample
    reference_tokens: int  # the reference images' tokens in one sample (cond and ref branches)
    sample_tokens: int  # the largest sample: text + references + image
    step_tokens: int  # transformer tokens of the largest step (every sample of every active branch)
    total_tokens: int  # transformer tokens over all steps: the compute the request asks for


def generation_cost(
    request: GenerationRequest, image_sizes: Sequence[tuple[int, int]], return_latents: bool
) -> GenerationCost:
    """`image_sizes` are the input images' (height, width) from their headers."""
    refs = [fit_size(h, w, request.max_pixels, request.max_input_image_side_length) for h, w in image_sizes]
    (gen_h, gen_w), (out_h, out_w) = generation_size(request.width, request.height, request.max_pixels, refs)
    n = request.num_images_per_prompt
    output_pixels = n * out_h * out_w
    output = int(output_pixels * 3 * ENCODING_SLACK)
    if return_latents:
        output += n * LATENT_CHANNELS * (gen_h // VAE_SCALE) * (gen_w // VAE_SCALE) * 4
    image = _patches(gen_h, gen_w)
    references = sum(_patches(h, w) for h, w in refs)
    cut = request.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    prompt, negative = (
        min(len(text.encode()) + CHAT_TEMPLATE_TOKENS, cut) for text in (request.prompt, request.negative_prompt)
    )
    branch_tokens = {
        Branch.COND: prompt + references + image,
        Branch.REF: negative + references + image,
        Branch.UNCOND: negative + image,
    }
    branches = [_branches(request, i, bool(refs)) for i in range(request.steps)]
    steps = [n * sum(branch_tokens[b] for b in step) for step in branches]
    return GenerationCost(
        output_bytes=output,
        output_pixels=output_pixels,
        input_pixels=sum(h * w for h, w in image_sizes),
        text_tokens=max(prompt, negative),
        image_tokens=image,
        reference_tokens=references,
        sample_tokens=max(branch_tokens[b] for step in branches for b in step),
        step_tokens=max(steps),
        total_tokens=sum(steps),
    )


def _patches(height: int, width: int) -> int:
    return (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)


def _branches(request: GenerationRequest, step: int, has_refs: bool) -> tuple[Branch, ...]:
    guidance = step_guidance(
        step, request.steps, request.text_guidance_scale, request.image_guidance_scale, request.cfg_range, has_refs
    )
    return guidance.branches


# Understand (Qwen2.5-VL): an image becomes one token per 28x28 pixels (14-px patches merged 2x2) after resizing
# into [MIN_VISION_PIXELS, max_pixels], plus its start and end markers; each message adds its role markers, and
# the template a default system message.
VISION_PATCH = 28
IMAGE_MARKER_TOKENS = 2
MESSAGE_TEMPLATE_TOKENS = 8
SYSTEM_TEMPLATE_TOKENS = 32


@dataclass(frozen=True)
class ChatCost:
    prompt_tokens: int  # an upper bound, at most the prompt-token limit (the model refuses longer prompts first)
    new_tokens: int  # max_new_tokens

    @property
    def total_tokens(self) -> int:
        """The answer's whole sequence, what its key-value cache grows to."""
        return self.prompt_tokens + self.new_tokens


def chat_cost(
    texts: Sequence[str],
    messages: int,
    image_sizes: Sequence[tuple[int, int]],
    max_pixels: int,
    max_new_tokens: int,
    max_prompt_tokens: int,
) -> ChatCost:
    """`image_sizes` are (height, width) from the images' headers; text is bounded by its UTF-8 bytes."""
    text = sum(len(t.encode()) for t in texts) + messages * MESSAGE_TEMPLATE_TOKENS + SYSTEM_TEMPLATE_TOKENS
    images = sum(_vision_tokens(h, w, max_pixels) + IMAGE_MARKER_TOKENS for h, w in image_sizes)
    return ChatCost(prompt_tokens=min(text + images, max_prompt_tokens), new_tokens=max_new_tokens)


def _vision_tokens(height: int, width: int, max_pixels: int) -> int:
    cells = -(-height // VISION_PATCH) * -(-width // VISION_PATCH)  # sides rounded up: never fewer than resized
    return max(MIN_VISION_PIXELS, min(max_pixels, cells * VISION_PATCH**2)) // VISION_PATCH**2
