"""The `omnigen2` BLS on a real `tritonserver`: golden parity, streaming, shared steps, cancellation, errors."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.triton.launcher import TritonServer
from serving.triton.wire import WireError
from tests.golden import relative_error
from tests.integration.triton_stats import assert_generation_stopped, executions, model_counts
from tests.integration.triton_stream import GenerationStream, case_params

CASES = ["t2i_euler", "edit_one_image", "in_context_two_images", "t2i_dpmsolver_cfgrange"]


def _case(cases: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cases["pipeline_cases"] if c["name"] == name)


@pytest.mark.parametrize("name", CASES)
def test_golden_case_through_triton(triton: TritonServer, cases: dict[str, Any], golden: Path, name: str) -> None:
    case = _case(cases, name)
    images = [(golden / f).read_bytes() for f in case["images"]]
    out = GenerationStream(triton.grpc_url, case_params(case), images).wait()
    assert out.error is None, out.error
    assert [e["type"] for e in out.events] == ["progress"] * case["steps"] + ["result"]
    assert [e["step"] for e in out.events[:-1]] == list(range(1, case["steps"] + 1))
    assert relative_error(out.latents, np.load(golden / case["final_latents"])) <= 1e-3
    assert out.images is not None and list(out.images.shape) == case["output_shape"]
    # The BLS sends 8-bit images: the golden float image rounded, give or take one level at a tie.
    expected = np.round(np.load(golden / case["output"]) * 255).astype(np.int16)
    assert out.images.dtype == np.uint8 and int(np.abs(out.images.astype(np.int16) - expected).max()) <= 1
    result = out.result
    assert result["seed"] == case["seed"] and set(result["timings"]) >= {"text_encode", "denoise", "vae_decode"}


def _feature_case(cases: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cases["feature_cases"] if c["name"] == name)


def _feature_images_match(images: np.ndarray | None, expected: np.ndarray) -> bool:
    """Within 1e-4 of the golden float image once rounded to the 8 bits the BLS sends."""
    assert images is not None and images.dtype == np.uint8 and images.shape == expected.shape
    return float(np.abs(images / 255.0 - expected).max()) <= 0.5 / 255 + 1e-4


@pytest.mark.parametrize(
    "name", ["f_five_images", "f_two_per_prompt", "f_long_prompt_truncated", "f_teacache_t2i", "f_taylorseer_edit"]
)
def test_golden_feature_case_through_triton(
    triton: TritonServer, cases: dict[str, Any], golden: Path, name: str
) -> None:
    case = _feature_case(cases, name)
    images = [(golden / f).read_bytes() for f in case["images"]]
    out = GenerationStream(triton.grpc_url, case_params(case), images).wait()
    assert out.error is None, out.error
    assert relative_error(out.latents, np.load(golden / case["final_latents"])) <= 1e-5
    assert _feature_images_match(out.images, np.load(golden / case["output"]))
    assert (out.result["truncated_prompt_tokens"] > 0) == ("max_sequence_length" in case)
    assert out.result["truncated_negative_prompt_tokens"] == 0
    assert out.result["cache"] == case.get("cache", "none") and out.result["cache_note"] == ""


def test_cached_and_uncached_generations_share_steps(triton: TritonServer, cases: dict[str, Any], golden: Path) -> None:
    """TeaCache, TaylorSeer and uncached requests at once: the step batcher merges them, each keeps its own state."""
    tea, taylor = _feature_case(cases, "f_teacache_t2i"), _feature_case(cases, "f_taylorseer_edit")
    taylor_images = [(golden / f).read_bytes() for f in taylor["images"]]
    # The uncached request runs 30 steps, started first, so the cached ones step while it does however slow the
    # machine is; it only has to differ from the TeaCache result.
    requests = [
        (case_params(tea, cache="none", steps=30), []),
        (case_params(tea), []),
        (case_params(taylor), taylor_images),
    ]
    # Executions alone are measured, not assumed: grouping may split an edit's step by reference count once the
    # learned call cost says padding costs more than a call, and that depends on the calls before this test.
    start = model_counts(triton, "transformer")
    alone = [GenerationStream(triton.grpc_url, p, i).wait() for p, i in requests]
    middle = model_counts(triton, "transformer")
    streams = [GenerationStream(triton.grpc_url, p, i) for p, i in requests]
    together = [s.wait() for s in streams]
    end = model_counts(triton, "transformer")
    assert all(r.error is None for r in alone + together), [r.error for r in alone + together]
    for result, case in zip(together[1:], (tea, taylor), strict=True):
        assert relative_error(result.latents, np.load(golden / case["final_latents"])) <= 1e-5
        assert result.result["cache"] == case["cache"] and result.result["cache_note"] == ""
    assert relative_error(together[0].latents, np.load(golden / tea["final_latents"])) > 1e-5
    ran_alone, ran_together = middle.minus(start), end.minus(middle)
    assert ran_together.inferences == ran_alone.inferences, "the same samples, alone or together"
    assert ran_together.executions < ran_alone.executions, "no transformer execution was shared"


def test_text_features_are_cached_per_truncation_length(
    triton: TritonServer, cases: dict[str, Any], golden: Path
) -> None:
    """Negative control: the same long prompt at the default length (512 here) gets its own features and misses."""
    case = _feature_case(cases, "f_long_prompt_truncated")
    truncated = GenerationStream(triton.grpc_url, case_params(case)).wait()
    params = case_params(case)
    del params["max_sequence_length"]
    default = GenerationStream(triton.grpc_url, params).wait()
    assert truncated.error is None and default.error is None
    expected = np.load(golden / case["final_latents"])
    assert relative_error(truncated.latents, expected) <= 1e-5
    assert relative_error(default.latents, expected) > 1e-5
    assert 0 < default.result["truncated_prompt_tokens"] < truncated.result["truncated_prompt_tokens"]


def test_concurrent_requests_share_transformer_executions(
    triton: TritonServer, cases: dict[str, Any], golden: Path
) -> None:
    """Four requests of different shapes at once: each equals its own sequential run, in fewer executions."""
    requests = [
        (case_params(_case(cases, "t2i_euler"), steps=6), []),
        (case_params(_case(cases, "edit_one_image"), steps=6), [(golden / "edit_one_image_input0.png").read_bytes()]),
        (
            case_params(_case(cases, "in_context_two_images"), steps=6, cfg_range=[0.0, 1.0]),
            [(golden / f).read_bytes() for f in _case(cases, "in_context_two_images")["images"]],
        ),
        (case_params(_case(cases, "t2i_dpmsolver_cfgrange"), steps=6, prompt="A different, longer prompt here."), []),
    ]
    start = model_counts(triton, "transformer")
    sequential = [GenerationStream(triton.grpc_url, p, i).wait() for p, i in requests]
    middle = model_counts(triton, "transformer")
    streams = [GenerationStream(triton.grpc_url, p, i) for p, i in requests]
    concurrent = [s.wait() for s in streams]
    end = model_counts(triton, "transformer")
    for alone, together in zip(sequential, concurrent, strict=True):
        assert alone.error is None and together.error is None
        assert relative_error(together.latents, alone.latents) <= 1e-4
    # Samples over 6 steps: t2i 2 branches (12), edit and in-context 3 branches (18 + 18), and DPM with guidance
    # on steps 0-3 of 6 only (i/N <= 0.5): 4 x 2 + 2 x 1 = 10. Alone, each step is one execution.
    assert (middle.executions - start.executions, middle.inferences - start.inferences) == (4 * 6, 58)
    # Together: the same 58 samples in fewer executions than the 24 alone. How many fewer is not fixed by the
    # setup: the requests with images join after their VAE encode (the others step alone meanwhile), and grouping
    # splits a step by reference count when the learned call cost says padding costs more (10 to 15 seen).
    executions, samples = end.executions - middle.executions, end.inferences - middle.inferences
    assert samples == 58
    assert 6 <= executions < 24, f"{executions} transformer executions for 24 request-steps: nothing was shared"


def test_cancellation_stops_the_loop_within_a_step(triton: TritonServer, cases: dict[str, Any]) -> None:
    params = case_params(_case(cases, "t2i_euler"), steps=200, width=256, height=256)
    before = executions(triton, "transformer")
    stream = GenerationStream(triton.grpc_url, params)
    assert stream.next_event() is not None  # running
    stream.cancel()
    assert_generation_stopped(triton, before, 200)
    after = GenerationStream(triton.grpc_url, case_params(_case(cases, "t2i_euler"))).wait()
    assert after.error is None  # its slot was freed: the triton keeps serving


def test_invalid_request_names_the_field(triton: TritonServer, cases: dict[str, Any]) -> None:
    for overrides, field in [
        ({"steps": 0}, "steps"),
        ({"scheduler": "ddim"}, "scheduler"),
        ({"colour": 1}, "colour"),
        ({"max_sequence_length": 513}, "max_sequence_length"),  # over the tiny checkpoint's 512 text positions
    ]:
        out = GenerationStream(triton.grpc_url, case_params(_case(cases, "t2i_euler"), **overrides)).wait()
        assert out.error is not None
        error = WireError.parse(out.error.message())
        assert (error.code, error.field) == ("INVALID_ARGUMENT", field)
    bad_image = GenerationStream(triton.grpc_url, case_params(_case(cases, "t2i_euler")), [b"not an image"]).wait()
    assert bad_image.error is not None
    assert WireError.parse(bad_image.error.message()).field == "images[0]"


def test_a_request_refused_for_one_of_its_images_leaves_no_work_behind(triton: TritonServer) -> None:
    """images[0] undecodable beside four that take a while: the request is refused naming images[0], and none of
    its other decodes runs on after the refusal. Before, one did and checked is_cancelled() on a request Triton
    had freed: tritonserver died of SIGSEGV within the first ten such requests (every later test with it)."""
    pixels = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    good = io.BytesIO()
    Image.fromarray(pixels).save(good, format="PNG")
    params = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "seed": 1}
    for _ in range(3):
        streams = [GenerationStream(triton.grpc_url, params, [b"garbage", *[good.getvalue()] * 4]) for _ in range(10)]
        for stream in streams:
            out = stream.wait()
            assert out.error is not None and WireError.parse(out.error.message()).field == "images[0]"
    assert triton.process is not None and triton.process.poll() is None


def test_previews_stream_when_asked(triton: TritonServer, cases: dict[str, Any]) -> None:
    out = GenerationStream(triton.grpc_url, case_params(_case(cases, "t2i_euler"), preview=True)).wait()
    assert out.error is None and out.previews == _case(cases, "t2i_euler")["steps"]


def test_random_seed_is_reported(triton: TritonServer, cases: dict[str, Any]) -> None:
    params = case_params(_case(cases, "t2i_euler"))
    del params["seed"]
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(GenerationStream(triton.grpc_url, params).wait().result["seed"]))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 2 and all(0 <= s < 2**63 for s in results)
