"""The node classes, in ComfyUI's convention: INPUT_TYPES (a classmethod), RETURN_TYPES, FUNCTION, CATEGORY.

Each run opens a client to the server named on the node (connection.py: the token, from the node or else from
OMNIGEN2_TOKEN, goes as a bearer token); the server's defaults, limits and validation apply, and its refusals surface
in ComfyUI as the node's error.
"""

from __future__ import annotations

from typing import Any

import torch
from omnigen2.client import DEFAULT_SERVER
from omnigen2.limits import MAX_INPUT_IMAGES, MAX_NEW_TOKENS, MAX_SEQUENCE_LENGTH, RANDOM_SEEDS
from omnigen2.messages import GenerationOptions, GenerationResult

from .connection import TOKEN_ENV, open_client
from .tensors import from_pil, to_pil

CATEGORY = "OmniGen2"
# ComfyUI's front end holds widget values as JavaScript numbers (doubles) and saves workflows as JSON: integers up to
# 2^53 - 1 (Number.MAX_SAFE_INTEGER) come back as typed; a larger seed would be sent as another one. The server takes
# up to 2^63 - 1, and its own random seeds stay below 2^53, so each of them can be typed here.
MAX_WIDGET_SEED = RANDOM_SEEDS - 1

InputTypes = dict[str, dict[str, tuple[Any, ...]]]


def _connection() -> dict[str, tuple[Any, ...]]:
    return {
        "server": ("STRING", {"default": DEFAULT_SERVER, "tooltip": "host:port of the OmniGen2 API"}),
    }


def _token() -> dict[str, tuple[Any, ...]]:
    return {
        "token": (
            "STRING",
            {
                "default": "",
                "tooltip": f"bearer token, when the server asks for one; empty: ${TOKEN_ENV}. A token typed here is "
                "saved in the workflow, and SaveImage writes the workflow into every PNG: prefer the variable",
            },
        ),
        "tls": ("BOOLEAN", {"default": False, "tooltip": "TLS, verifying the server against the system's CAs"}),
        "allow_plaintext_token": (
            "BOOLEAN",
            {"default": False, "tooltip": "send the token without TLS to a server not on this machine (readable)"},
        ),
    }


def _settings(size_default: int) -> dict[str, tuple[Any, ...]]:
    """The generation settings of the API; 0 (size, max_sequence_length) leaves a field to the server."""
    size = {"default": size_default, "min": 0, "max": 4096, "step": 8, "tooltip": "0: the server's default"}
    return {
        "width": ("INT", size),
        "height": ("INT", size),
        "steps": ("INT", {"default": 50, "min": 1, "max": 200}),
        "text_guidance_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1}),
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_WIDGET_SEED}),
        "num_images": ("INT", {"default": 1, "min": 1, "max": 8}),
    }


def _optional_settings() -> dict[str, tuple[Any, ...]]:
    return {
        "negative_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "empty: the server's default"}),
        "image_guidance_scale": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 100.0, "step": 0.1}),
        "cfg_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05}),
        "cfg_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05}),
        "scheduler": (["euler", "dpmsolver"], {"default": "euler"}),
        "max_sequence_length": (
            "INT",
            {"default": 0, "min": 0, "max": MAX_SEQUENCE_LENGTH, "tooltip": "0: the server's default"},
        ),
        "cache": (["none", "teacache", "taylorseer"], {"default": "none", "tooltip": "step caching: faster, drifts"}),
        "teacache_threshold": ("FLOAT", {"default": 0.05, "min": 0.01, "max": 1.0, "step": 0.01}),
        **_token(),
    }


def _options(settings: dict[str, Any]) -> GenerationOptions:
    options = GenerationOptions(
        steps=settings["steps"],
        text_guidance_scale=settings["text_guidance_scale"],
        image_guidance_scale=settings.get("image_guidance_scale", 2.0),
        cfg_range=(settings.get("cfg_start", 0.0), settings.get("cfg_end", 1.0)),
        scheduler=settings.get("scheduler", "euler"),
        cache=settings.get("cache", "none"),
        seed=settings["seed"],
        num_images_per_prompt=settings["num_images"],
        output_format="png",  # lossless: the tensor holds the server's pixels
    )
    for name in ("width", "height", "max_sequence_length"):
        if settings.get(name):
            options[name] = settings[name]
    if options["cache"] == "teacache":
        options["teacache_threshold"] = settings.get("teacache_threshold", 0.05)
    if settings.get("negative_prompt"):
        options["negative_prompt"] = settings["negative_prompt"]
    return options


def _run(server: str, prompt: str, images: list[torch.Tensor], settings: dict[str, Any]) -> tuple[torch.Tensor, int]:
    inputs = [frame for batch in images for frame in to_pil(batch)]
    token, tls = settings.get("token", ""), settings.get("tls", False)
    with open_client(server, token, tls, settings.get("allow_plaintext_token", False)) as client:
        result = client.generate(prompt, inputs, **_options(settings))
    return result_images(result), result.seed


def result_images(result: GenerationResult) -> torch.Tensor:
    """The images as one IMAGE batch; when the server's safety classifier withheld every one, an error that says so
    (ComfyUI shows it as the node's error) rather than an empty batch no node can take."""
    if not result.images:
        reasons = "; ".join(
            f"image {w.index}: " + ", ".join(f"{f.label} {f.score:.2f} (threshold {f.threshold:g})" for f in w.findings)
            for w in result.withheld
        )
        raise RuntimeError(f"the server's safety classifier withheld every image ({reasons or 'no reason given'})")
    return from_pil(result.images)


class OmniGen2Generate:
    """Text to image."""

    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("images", "seed")

    @classmethod
    def INPUT_TYPES(cls) -> InputTypes:  # noqa: N802 (ComfyUI's name)
        required = {**_connection(), "prompt": ("STRING", {"multiline": True, "default": ""}), **_settings(1024)}
        return {"required": required, "optional": _optional_settings()}

    def generate(self, server: str, prompt: str, **settings: Any) -> tuple[torch.Tensor, int]:
        return _run(server, prompt, [], settings)


class OmniGen2EditCompose:
    """One image and an instruction: an edit. Up to five: a new image from them (in-context generation).

    Every frame of every connected IMAGE is one input image, in order (image, then image_2 ... image_5)."""

    CATEGORY = CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("images", "seed")

    @classmethod
    def INPUT_TYPES(cls) -> InputTypes:  # noqa: N802 (ComfyUI's name)
        required = {
            **_connection(),
            "image": ("IMAGE",),
            "prompt": ("STRING", {"multiline": True, "default": ""}),
            **_settings(0),  # with one image and no size, the edit keeps the image's size
        }
        more = {f"image_{i}": ("IMAGE",) for i in range(2, MAX_INPUT_IMAGES + 1)}
        return {"required": required, "optional": {**more, **_optional_settings()}}

    def edit(self, server: str, image: torch.Tensor, prompt: str, **settings: Any) -> tuple[torch.Tensor, int]:
        more = [settings.pop(f"image_{i}", None) for i in range(2, MAX_INPUT_IMAGES + 1)]
        return _run(server, prompt, [image, *(batch for batch in more if batch is not None)], settings)


class OmniGen2Understand:
    """A question about up to five images (or none), answered by OmniGen2's Qwen2.5-VL."""

    CATEGORY = CATEGORY
    FUNCTION = "understand"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("answer",)

    @classmethod
    def INPUT_TYPES(cls) -> InputTypes:  # noqa: N802 (ComfyUI's name)
        required = {
            **_connection(),
            "question": ("STRING", {"multiline": True, "default": "Describe the image."}),
            "max_new_tokens": ("INT", {"default": 512, "min": 1, "max": MAX_NEW_TOKENS}),
            "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "0: greedy"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_WIDGET_SEED}),
        }
        images = {f"image_{i}": ("IMAGE",) for i in range(1, MAX_INPUT_IMAGES + 1)}
        return {"required": required, "optional": {**images, **_token()}}

    def understand(
        self,
        server: str,
        question: str,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        token: str = "",
        tls: bool = False,
        allow_plaintext_token: bool = False,
        **images: torch.Tensor,
    ) -> tuple[str]:
        inputs = [frame for _, batch in sorted(images.items()) for frame in to_pil(batch)]
        with open_client(server, token, tls, allow_plaintext_token) as client:
            result = client.understand(
                question, inputs, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
            )
        return (result.text,)


NODE_CLASS_MAPPINGS = {
    "OmniGen2Generate": OmniGen2Generate,
    "OmniGen2EditCompose": OmniGen2EditCompose,
    "OmniGen2Understand": OmniGen2Understand,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "OmniGen2Generate": "OmniGen2 Generate",
    "OmniGen2EditCompose": "OmniGen2 Edit / Compose",
    "OmniGen2Understand": "OmniGen2 Understand",
}
