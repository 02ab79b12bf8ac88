"""The whole served stack through the SDK: front end (own process) -> real tritonserver -> BLS -> ORT components."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from omnigen2 import (
    AsyncOmniGen2Client,
    DeadlineExceededError,
    GenerationOptions,
    GenerationResult,
    GenerationUsage,
    InvalidArgumentError,
    OmniGen2Client,
    Progress,
    ResourceExhaustedError,
    UnavailableError,
)
from omnigen2.cli import main as cli_main
from omnigen2.errors import from_rpc_error
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image

from serving.frontend.metrics_page import sample
from serving.frontend.process import FrontendProcess
from serving.pipeline.request import DEFAULT_LIMITS
from serving.triton.launcher import TritonServer
from serving.triton.ports import free_port
from tests.golden import relative_error, templated_tokens
from tests.integration.triton_stats import assert_generation_stopped, executions
from tests.pixels import level_difference

CASES = ["t2i_euler", "edit_one_image", "in_context_two_images", "t2i_dpmsolver_cfgrange"]
SMALL: GenerationOptions = {"width": 64, "height": 64, "steps": 3, "seed": 1}


def _case(cases: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cases["pipeline_cases"] if c["name"] == name)


def _case_options(case: dict[str, Any]) -> GenerationOptions:
    options: GenerationOptions = {
        "negative_prompt": case["negative_prompt"],
        "steps": case["steps"],
        "text_guidance_scale": case["text_guidance_scale"],
        "image_guidance_scale": case["image_guidance_scale"],
        "cfg_range": tuple(case["cfg_range"]),
        "scheduler": "dpmsolver" if case["scheduler"] == "dpmsolver++" else "euler",
        "seed": case["seed"],
        "return_latents": True,
    }
    if case["width"] is not None:
        options |= {"width": case["width"], "height": case["height"]}
    return options


@pytest.fixture(scope="module")
def client(api: FrontendProcess) -> OmniGen2Client:
    return OmniGen2Client(api.address, timeout=120)


@pytest.mark.parametrize("name", CASES)
def test_golden_case_end_to_end(client: OmniGen2Client, cases: dict[str, Any], golden: Path, name: str) -> None:
    case = _case(cases, name)
    images = [golden / f for f in case["images"]]
    result = client.generate(case["prompt"], images, **_case_options(case))
    assert result.latents is not None
    assert relative_error(result.latents.numpy(), np.load(golden / case["final_latents"])) <= 1e-3
    expected = np.load(golden / case["output"])
    assert [len(result.images), result.images[0].height, result.images[0].width, 3] == case["output_shape"]
    # PNG holds 8 bits: every pixel must be the golden float image rounded, give or take one level at a tie.
    served = np.stack([np.asarray(image, dtype=np.int16) for image in result.images])
    assert int(np.abs(served - np.round(expected * 255).astype(np.int16)).max()) <= 1
    assert result.seed == case["seed"]
    assert result.timings["total"] >= result.timings["denoise"] > 0


def test_long_prompt_is_truncated_end_to_end(client: OmniGen2Client, cases: dict[str, Any], golden: Path) -> None:
    case = next(c for c in cases["feature_cases"] if c["name"] == "f_long_prompt_truncated")
    options = _case_options(case) | {"max_sequence_length": case["max_sequence_length"]}
    result = client.generate(case["prompt"], **options)
    assert result.latents is not None
    assert relative_error(result.latents.numpy(), np.load(golden / case["final_latents"])) <= 1e-5
    served = np.asarray(result.images[0], dtype=np.float64) / 255
    assert float(np.abs(served - np.load(golden / case["output"])[0]).max()) <= 0.5 / 255 + 1e-4  # PNG: 8 bits
    assert result.truncated_prompt_tokens > 0 and result.truncated_negative_prompt_tokens == 0
    fits = client.generate("A red car", **SMALL)
    assert fits.truncated_prompt_tokens == fits.truncated_negative_prompt_tokens == 0


@pytest.mark.parametrize("name", ["f_teacache_t2i", "f_taylorseer_edit"])
def test_step_caching_end_to_end(client: OmniGen2Client, cases: dict[str, Any], golden: Path, name: str) -> None:
    """The SDK's cache options reach the BLS, and the result says which caching ran."""
    case = next(c for c in cases["feature_cases"] if c["name"] == name)
    options = _case_options(case) | {"cache": case["cache"]}
    if "teacache_rel_l1_thresh" in case:
        options["teacache_threshold"] = case["teacache_rel_l1_thresh"]
    result = client.generate(case["prompt"], [golden / f for f in case["images"]], **options)
    assert result.latents is not None and (result.cache, result.cache_note) == (case["cache"], "")
    assert relative_error(result.latents.numpy(), np.load(golden / case["final_latents"])) <= 1e-5


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_usage_counts_text_input_image_and_output_tokens(client: OmniGen2Client, tiny_checkpoint: Path) -> None:
    """Counted here from the request alone: text through the checkpoint's tokenizer and chat template, images as
    16x16-pixel patches (every size below is a multiple of 16 within the default pixel budget)."""

    def tokens(prompt: str, cut: int = 512) -> int:
        return templated_tokens(tiny_checkpoint, prompt, cut)

    options: GenerationOptions = {"negative_prompt": "blurry", "num_images_per_prompt": 2, "steps": 2, "seed": 1}
    two = client.generate("A red apple", width=64, height=48, **options)
    assert two.usage == GenerationUsage(tokens("A red apple") + tokens("blurry"), 0, 2 * (64 // 16) * (48 // 16))
    # No text guidance: the negative prompt is not read. 40x24 is generated at 32x16 and resized.
    unguided = client.generate(
        "A red apple", negative_prompt="blurry", text_guidance_scale=1.0, width=40, height=24, steps=2
    )
    assert unguided.usage == GenerationUsage(tokens("A red apple"), 0, (32 // 16) * (16 // 16))
    cut = client.generate("A red apple", max_sequence_length=20, **SMALL)
    assert cut.usage.text_tokens == tokens("A red apple", 20) + tokens("", 20) == 40
    # One input image and no size: generated at the input's size.
    edited = client.edit(_png(64, 48), "Make it blue", steps=2, seed=3)
    assert edited.usage == GenerationUsage(tokens("Make it blue") + tokens(""), 4 * 3, 4 * 3)
    composed = client.compose([_png(64, 48), _png(32, 32)], "Both", width=48, height=32, steps=2, seed=3)
    assert composed.usage == GenerationUsage(tokens("Both") + tokens(""), 4 * 3 + 2 * 2, 3 * 2)
    streamed = list(client.stream("A red apple", width=64, height=48, **options))[-1]
    assert isinstance(streamed, GenerationResult) and streamed.usage == two.usage


def test_cli_asks_for_step_caching(api: FrontendProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cached.png"
    argv = ["--server", api.address, "generate", "A red car", "-o", str(out), "--width", "64", "--height", "64"]
    assert cli_main([*argv, "--steps", "3", "--cache", "taylorseer", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert Image.open(out).size == (64, 64) and "step caching" not in printed.err
    assert "-> 16 output tokens" in printed.out  # 64x64 pixels: 4x4 patches of 16 px


def test_stream_is_ordered_and_complete(client: OmniGen2Client) -> None:
    events = list(client.stream("A lighthouse at dusk", **(SMALL | {"steps": 5})))
    assert [e.step for e in events[:-1] if isinstance(e, Progress)] == [1, 2, 3, 4, 5]
    assert all(isinstance(e, Progress) and e.total == 5 and e.preview is None for e in events[:-1])
    assert isinstance(events[-1], GenerationResult) and len(events) == 6


def test_previews_every_k_steps_at_the_output_size(client: OmniGen2Client) -> None:
    """A preview is a full VAE decode: the caller picks how often; the last step always has one, at the size the
    final image will have (40x24 is generated at 32x16 and resized)."""
    options: GenerationOptions = SMALL | {"steps": 5, "width": 40, "height": 24, "preview_every": 2}
    events = list(client.stream("A lighthouse at dusk", previews=True, **options))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [e.step for e in progress if e.preview is not None] == [2, 4, 5]
    assert all(e.preview.size == (40, 24) for e in progress if e.preview is not None)
    with pytest.raises(InvalidArgumentError) as raised:
        list(client.stream("x", previews=True, **(SMALL | {"preview_every": 0})))
    assert [v.field for v in raised.value.violations] == ["preview_every"]


def test_stream_previews_when_asked(client: OmniGen2Client) -> None:
    events = list(client.stream("A lighthouse at dusk", previews=True, **SMALL))
    previews = [e.preview for e in events if isinstance(e, Progress)]
    assert len(previews) == 3 and all(p is not None and p.size == (64, 64) for p in previews)


def test_stream_and_unary_give_the_same_images(client: OmniGen2Client) -> None:
    unary = client.generate("A bowl of fruit", **SMALL)
    streamed = list(client.stream("A bowl of fruit", **SMALL))[-1]
    assert isinstance(streamed, GenerationResult) and streamed.encoded == unary.encoded


def test_edit_and_compose_take_paths_bytes_and_pil(client: OmniGen2Client, golden: Path) -> None:
    source = golden / "edit_one_image_input0.png"
    edited = client.edit(source, "Make it night", steps=2, seed=3)
    with Image.open(source) as original:
        assert edited.images[0].size == original.size  # one image and no size: the input's (processed) size
        pil = original.copy()
    composed = client.compose(
        [source.read_bytes(), pil], "Both together", width=48, height=32, steps=2, num_images_per_prompt=2
    )
    assert [image.size for image in composed.images] == [(48, 32), (48, 32)]


def test_random_seed_is_returned_and_reproduces(client: OmniGen2Client) -> None:
    first = client.generate("A quiet lake", width=64, height=64, steps=2)
    assert 0 <= first.seed < 2**63
    again = client.generate("A quiet lake", width=64, height=64, steps=2, seed=first.seed)
    assert again.encoded == first.encoded


@pytest.mark.parametrize(
    ("name", "enum", "mime"),
    [("jpeg", pb.IMAGE_FORMAT_JPEG, "image/jpeg"), ("webp", pb.IMAGE_FORMAT_WEBP, "image/webp")],
)
def test_output_formats(api: FrontendProcess, client: OmniGen2Client, name: Any, enum: int, mime: str) -> None:
    low = client.generate("Stripes", output_format=name, quality=5, **SMALL)
    high = client.generate("Stripes", output_format=name, quality=100, **SMALL)
    assert Image.open(io.BytesIO(high.encoded[0])).format == name.upper()
    assert len(low.encoded[0]) < len(high.encoded[0])
    stub = pb_grpc.OmniGen2Stub(grpc.insecure_channel(api.address))
    response = stub.Generate(pb.GenerateRequest(prompt="Stripes", output_format=enum, steps=1, width=48, height=32))
    assert (response.images[0].mime_type, response.images[0].width, response.images[0].height) == (mime, 48, 32)


def test_async_client_runs_concurrent_calls(api: FrontendProcess, client: OmniGen2Client) -> None:
    prompts = ["A red door", "A green door", "A blue door"]
    expected = [client.generate(p, **SMALL).encoded for p in prompts]

    async def run() -> tuple[list[GenerationResult], list[Any]]:
        async with AsyncOmniGen2Client(api.address, timeout=120) as aclient:
            results = await asyncio.gather(*(aclient.generate(p, **SMALL) for p in prompts))
            events = [event async for event in aclient.stream(prompts[0], **SMALL)]
            info = await aclient.info()
            assert info.model == "OmniGen2"
            return list(results), events

    results, events = asyncio.run(run())
    # Run at once, the three share transformer calls: their images equal the ones run alone to rounding only (one
    # level of 255, docs/api.md); exactly on some CPUs, not on all. The stream after them runs alone again.
    differences = [level_difference(r.encoded, e) for r, e in zip(results, expected, strict=True)]
    assert max(differences) <= 1, differences
    assert isinstance(events[-1], GenerationResult) and events[-1].encoded == expected[0]


def test_model_info(client: OmniGen2Client, model_repository: Path) -> None:
    info = client.info()
    manifest = __import__("json").loads((model_repository / "repository.json").read_text())
    assert (info.model, info.backend, info.checkpoint_sha256) == (
        "OmniGen2",
        "onnxruntime",
        manifest["checkpoint_sha256"],
    )
    assert info.limits.max_input_images == 5 and info.limits.max_steps == DEFAULT_LIMITS.max_steps
    assert info.limits.max_concurrent_requests == 8
    assert info.defaults.steps == 50 and info.defaults.text_guidance_scale == 5.0
    assert info.limits.max_sequence_length == info.defaults.max_sequence_length == 512  # the tiny checkpoint's
    assert list(info.schedulers) == [pb.SCHEDULER_EULER, pb.SCHEDULER_DPMSOLVER]
    assert list(info.step_caches) == [pb.STEP_CACHE_NONE, pb.STEP_CACHE_TEACACHE, pb.STEP_CACHE_TAYLORSEER]
    assert info.defaults.cache == pb.STEP_CACHE_NONE and info.defaults.teacache_threshold == 0.05
    assert not info.safety.prompt_policy and not info.safety.output_classifier  # both off unless turned on


def _bomb() -> bytes:
    """A small PNG that decodes to more pixels than the input-image limit."""
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")
    return buffer.getvalue()


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * (DEFAULT_LIMITS.max_prompt_chars + 1)}, "prompt"),
    ({"negative_prompt": "x" * (DEFAULT_LIMITS.max_prompt_chars + 1)}, "negative_prompt"),
    ({"input_images": [pb.Image(data=b"")] * 6}, "input_images"),
    ({"input_images": [pb.Image(data=b"not an image")]}, "input_images[0].data"),
    ({"input_images": [pb.Image(data=b"")]}, "input_images[0].data"),
    ({"input_images": [pb.Image(data=b"\x89PNG\r\n\x1a\n")]}, "input_images[0].data"),
    ({"width": 0}, "width"),
    ({"height": -5}, "height"),
    ({"width": DEFAULT_LIMITS.max_side + 1}, "width"),
    ({"steps": 0}, "steps"),
    ({"steps": DEFAULT_LIMITS.max_steps + 1}, "steps"),
    ({"text_guidance_scale": float("nan")}, "text_guidance_scale"),
    ({"text_guidance_scale": float("inf")}, "text_guidance_scale"),
    ({"image_guidance_scale": -1.0}, "image_guidance_scale"),
    ({"cfg_range": pb.CfgRange(start=0.8, end=0.2)}, "cfg_range"),
    ({"cfg_range": pb.CfgRange(start=-0.1, end=1.0)}, "cfg_range"),
    ({"scheduler": 7}, "scheduler"),
    ({"seed": -1}, "seed"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"num_images_per_prompt": DEFAULT_LIMITS.max_images_per_prompt + 1}, "num_images_per_prompt"),
    ({"max_pixels": 10}, "max_pixels"),
    ({"max_input_image_side_length": 8}, "max_input_image_side_length"),
    ({"max_sequence_length": 0}, "max_sequence_length"),
    ({"max_sequence_length": DEFAULT_LIMITS.max_sequence_length + 1}, "max_sequence_length"),  # the front end's
    ({"max_sequence_length": 513}, "max_sequence_length"),  # the BLS's: the tiny checkpoint has 512 text positions
    ({"output_format": 9}, "output_format"),
    ({"cache": 9}, "cache"),
    ({"teacache_threshold": 0.0}, "teacache_threshold"),
    ({"teacache_threshold": 1.5}, "teacache_threshold"),
    ({"quality": 0}, "quality"),
    ({"quality": 101}, "quality"),
]


@pytest.mark.parametrize(("fields", "field"), INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_field_is_named(api: FrontendProcess, fields: dict[str, Any], field: str) -> None:
    stub = pb_grpc.OmniGen2Stub(grpc.insecure_channel(api.address))
    request = pb.GenerateRequest(prompt="A cat", width=64, height=64, steps=2)
    for name, value in fields.items():
        if name == "input_images":
            request.input_images.extend(value)
        elif name == "cfg_range":
            request.cfg_range.CopyFrom(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(request, timeout=30)
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.GenerateStream(request, timeout=30))
    for error in (raised.value, streamed.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The exact field names of the BadRequest details: a substring test would let "prompt" pass for
        # "negative_prompt".
        assert [v.field for v in from_rpc_error(error).violations] == [field]


def test_violations_come_typed_and_together(client: OmniGen2Client) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        client.generate("", steps=0, quality=0, images=[_bomb()])
    fields = [v.field for v in raised.value.violations]
    assert fields == ["input_images[0].data", "prompt", "steps", "quality"]
    assert "pixel limit" in raised.value.violations[0].description


def test_input_too_small_after_resizing_is_named(client: OmniGen2Client) -> None:
    """Found by the front end from the header, before admission (the BLS keeps the same check as a last guard)."""
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    with pytest.raises(InvalidArgumentError) as raised:
        client.edit(tiny.getvalue(), "Bigger", steps=1)
    assert [v.field for v in raised.value.violations] == ["input_images[0].data"]


def test_deadline_exceeded_stops_the_work(api: FrontendProcess, triton: TritonServer) -> None:
    impatient = OmniGen2Client(api.address, timeout=1.0)
    before = executions(triton, "transformer")
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        impatient.generate("A long one", width=256, height=256, steps=200, seed=1)
    assert time.monotonic() - started < 5
    assert_generation_stopped(triton, before, 200)


def test_cancelled_stream_stops_the_work(client: OmniGen2Client, triton: TritonServer) -> None:
    before = executions(triton, "transformer")
    stream = client.stream("A long one", width=256, height=256, steps=200, seed=1)
    assert isinstance(next(stream), Progress)
    stream.close()  # cancels the call
    assert_generation_stopped(triton, before, 200)
    assert client.generate("Still serving", **SMALL).images


def test_health_reflection_and_metrics(api: FrontendProcess, client: OmniGen2Client) -> None:
    assert api.health() == health_pb2.HealthCheckResponse.SERVING
    assert api.health("omnigen2.v1.OmniGen2") == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(api.address))
    assert "omnigen2.v1.OmniGen2" in set(database.get_services())
    assert database.FindFileContainingSymbol("omnigen2.v1.GenerateRequest").name == "omnigen2/v1/omnigen2.proto"
    with pytest.raises(InvalidArgumentError):
        client.generate("", **SMALL)
    assert client.generate("Counted", **SMALL).images  # its own, so the counts below hold for this test alone
    metrics = api.metrics()
    assert (sample(metrics, "omnigen2_requests_total", code="INVALID_ARGUMENT", method="Generate") or 0) > 0
    assert (sample(metrics, "omnigen2_requests_total", code="OK", method="Generate") or 0) > 0
    assert (sample(metrics, "omnigen2_denoise_step_seconds_count") or 0) > 0


def test_over_capacity_gets_resource_exhausted_with_retry_info(tmp_path: Path, triton: TritonServer) -> None:
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", "--max-in-flight=1", "--retry-after-s=2.5") as api:
        api.wait_health(health_pb2.HealthCheckResponse.SERVING)
        client = OmniGen2Client(api.address, timeout=60)
        before = executions(triton, "transformer")
        long_run = client.stream("Busy", width=256, height=256, steps=200, seed=1)
        assert isinstance(next(long_run), Progress)  # admitted and running
        with pytest.raises(ResourceExhaustedError) as raised:
            client.generate("One too many", **SMALL)
        assert raised.value.retry_after == 2.5
        long_run.close()
        assert_generation_stopped(triton, before, 200)
        assert client.generate("Room again", **SMALL).images  # the slot was given back


def test_triton_down_gives_unavailable_and_not_serving(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with FrontendProcess(dead, tmp_path / "frontend.log") as api:
        assert api.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        client = OmniGen2Client(api.address, timeout=30, retries=1)
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            client.generate("Anyone there?", **SMALL)
        with pytest.raises(UnavailableError):
            client.info()
        assert time.monotonic() - started < 10
