"""The web UI's settings panel -> SDK options (omnigen2.webui.settings), without a browser or a server."""

from __future__ import annotations

from dataclasses import astuple

import pytest
from omnigen2.limits import MAX_SEED, RANDOM_SEEDS
from omnigen2.messages import build_request
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.webui.settings import RANDOM_SEED, ChatSettings, GenerationSettings

from serving.frontend.model_info import api_limits, understand_limits
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS, ChatMessage, ChatPart, ChatRequest
from serving.pipeline.request import DEFAULT_LIMITS, GenerationRequest


def _info() -> pb.ModelInfo:
    defaults = pb.GenerateRequest(
        negative_prompt="blurry",
        steps=30,
        text_guidance_scale=4.5,
        image_guidance_scale=1.5,
        cfg_range=pb.CfgRange(start=0.0, end=0.6),
        scheduler=pb.SCHEDULER_DPMSOLVER,
        num_images_per_prompt=1,
        max_pixels=512 * 512,
        max_input_image_side_length=768,
        max_sequence_length=256,
        cache=pb.STEP_CACHE_TAYLORSEER,
        teacache_threshold=0.1,
    )
    return pb.ModelInfo(defaults=defaults, understand_defaults=pb.UnderstandRequest(max_new_tokens=64, top_p=0.9))


def test_panel_starts_at_the_served_defaults_and_the_operators_overrides() -> None:
    settings = GenerationSettings.from_model_info(_info(), steps=8, width=256, height=None)
    assert (settings.steps, settings.width, settings.height) == (8, 256, 0)  # None: not overridden
    assert settings.scheduler == "dpmsolver" and (settings.cfg_start, settings.cfg_end) == (0.0, 0.6)
    assert (settings.negative_prompt, settings.max_sequence_length, settings.max_pixels) == ("blurry", 256, 512 * 512)
    assert (settings.cache, settings.teacache_threshold) == ("taylorseer", 0.1)
    chat = ChatSettings.from_model_info(_info())
    assert (chat.max_new_tokens, chat.top_p, chat.seed) == (64, 0.9, -1)


def test_server_default_values_stay_unset_in_the_request() -> None:
    """Size 0 and seed -1 mean "the server's": the request leaves them unset, so the server's rules apply."""
    values = astuple(GenerationSettings(steps=4))
    request = build_request("a cat", [], GenerationSettings.from_values(values).options())
    assert not request.HasField("width") and not request.HasField("height") and not request.HasField("seed")
    assert not request.HasField("preview_every") and request.steps == 4
    assert request.cache == pb.STEP_CACHE_NONE and not request.HasField("teacache_threshold")
    assert request.output_format == pb.IMAGE_FORMAT_PNG  # lossless, so the page shows the server's pixels


def test_every_setting_reaches_the_request() -> None:
    # Gradio hands numbers over as floats.
    chosen = GenerationSettings(
        negative_prompt="dark", width=320.0, height=240.0, steps=12.0, text_guidance_scale=3, image_guidance_scale=1,
        cfg_start=0.1, cfg_end=0.9, scheduler="dpmsolver", seed=42.0, num_images_per_prompt=2.0,
        max_sequence_length=128.0, max_pixels=65536.0, max_input_image_side_length=512.0, cache="teacache",
        teacache_threshold=0.2, previews=True, preview_every=3.0,
    )  # fmt: skip
    settings = GenerationSettings.from_values(astuple(chosen))
    request = build_request("a cat", [], settings.options(), previews=settings.previews)
    assert (request.width, request.height, request.steps, request.seed) == (320, 240, 12, 42)
    assert (request.text_guidance_scale, request.image_guidance_scale) == (3.0, 1.0)
    assert (request.cfg_range.start, request.cfg_range.end) == (0.1, 0.9)
    assert request.scheduler == pb.SCHEDULER_DPMSOLVER and request.negative_prompt == "dark"
    assert (request.num_images_per_prompt, request.max_sequence_length) == (2, 128)
    assert (request.max_pixels, request.max_input_image_side_length) == (65536, 512)
    assert request.previews and request.preview_every == 3
    assert request.cache == pb.STEP_CACHE_TEACACHE and request.teacache_threshold == 0.2


def test_chat_settings_reach_the_options() -> None:
    options = ChatSettings.from_values((32.0, 0.7, 0.95, 40.0, 5.0)).options()
    assert options == {"max_new_tokens": 32, "temperature": 0.7, "top_p": 0.95, "top_k": 40, "seed": 5}
    assert "seed" not in ChatSettings.from_values((32, 0, 1, 0, -1)).options()


def test_the_seed_fields_keep_seeds_up_to_2_53_exactly() -> None:
    """The seed fields (gr.Number, precision 0) hand over integers, and every seed the server or SDK draws (below
    2^53) round-trips through the browser's doubles unchanged."""
    import gradio as gr

    field = gr.Number(precision=0)
    for seed in (2**53 - 1, 4591024147021620):
        assert field.preprocess(float(seed)) == seed and field.postprocess(seed) == seed


def _bounds(info: pb.ModelInfo) -> dict[str, tuple[float | None, float | None]]:
    """Each numeric control's (minimum, maximum) by element id, on the page built for `info`."""
    from omnigen2.client import OmniGen2Client
    from omnigen2.webui.app import build_app

    with OmniGen2Client("127.0.0.1:1") as client:  # the page reads no more than `info` while it is built
        app = build_app(client, info, "test")
    blocks = [b for b in app.blocks.values() if getattr(b, "elem_id", None) and hasattr(b, "minimum")]
    return {b.elem_id: (b.minimum, getattr(b, "maximum", None)) for b in blocks}


@pytest.mark.parametrize("served", [True, False], ids=["served limits", "none reported"])
def test_every_control_stops_where_the_server_does(served: bool) -> None:
    """Each bound of a control is a value the server takes (before: top_p started at 0, which it refuses with
    (0, 1]; max_pixels and the input side at 1, top_k unbounded, max_new_tokens up to 4096 past its 2048)."""
    info = _info()
    info.step_caches.extend([pb.STEP_CACHE_TEACACHE, pb.STEP_CACHE_TAYLORSEER])
    if served:
        info.limits.CopyFrom(api_limits(DEFAULT_LIMITS, 1, 1, DEFAULT_LIMITS.max_sequence_length))
        info.understand_limits.CopyFrom(understand_limits(DEFAULT_CHAT_LIMITS))
    bounds = _bounds(info)
    assert bounds["chat-top_p"][0] > 0 and bounds["chat-top_k"][1] is not None
    for name in ("steps", "num_images_per_prompt", "text_guidance_scale", "image_guidance_scale", "max_sequence_length",
                 "max_pixels", "max_input_image_side_length", "teacache_threshold"):  # fmt: skip
        for value in filter(None.__ne__, bounds[f"generate-{name}"]):
            assert not GenerationRequest(prompt="a", **{name: value}).violations(), (name, value)
    for name in ("max_new_tokens", "temperature", "top_p", "top_k"):
        for value in bounds[f"chat-{name}"]:
            message = ChatMessage("user", [ChatPart(text="a")])
            assert not ChatRequest([message], **{name: value}).violations(), (name, value)
    for key in ("generate-seed", "chat-seed"):  # -1: random; the rest the browser's doubles hold exactly
        assert bounds[key] == (RANDOM_SEED, RANDOM_SEEDS - 1) and RANDOM_SEEDS - 1 < MAX_SEED
        assert float(RANDOM_SEEDS - 1) == RANDOM_SEEDS - 1 and float(RANDOM_SEEDS + 1) != RANDOM_SEEDS + 1
