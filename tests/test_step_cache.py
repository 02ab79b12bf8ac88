"""Step caching (TeaCache, TaylorSeer) against the reference, and inside batched calls."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from serving.errors import InvalidArgumentError
from serving.pipeline.denoise import Denoiser, pack_samples, plan_sizes
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.image_tensors import preprocess_image
from serving.pipeline.packing import unpack_output
from serving.pipeline.request import GenerationRequest
from serving.pipeline.step_cache import (
    CacheBudget,
    Control,
    Mode,
    _Entry,
    _taylor_update,
    _TaylorEntry,
    _teacache_skip,
    _TeaGroup,
    decode_controls,
    encode_controls,
    state_values,
    taylor_full_call,
    teacache_rescale,
)
from tests.golden import relative_error, request_from_case

TOLERANCE = 1e-5  # feature cases: latents relative error


def _feature(cases: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cases["feature_cases"] if c["name"] == name)


def test_teacache_skips_the_reference_s_steps(
    golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path
) -> None:
    """The cond branch skips its middle steps, the uncond branch computes once more: the reference's count."""
    case = _feature(cases, "f_teacache_t2i")
    result = golden_pipeline(request_from_case(case, golden))
    assert result.main_layer_passes == case["main_layer_passes"] == 5
    assert relative_error(result.latents, np.load(golden / case["final_latents"])) <= TOLERANCE


def test_taylorseer_computes_only_its_full_calls(
    golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path
) -> None:
    """The reference calls the layers 42 times (3 branches x 14 steps) and they extrapolate inside on 18 of them;
    here those 18 leave the main layers: 3 x 8 full calls (the first 5, then every 3rd)."""
    case = _feature(cases, "f_taylorseer_edit")
    result = golden_pipeline(request_from_case(case, golden))
    assert case["main_layer_passes"] == 3 * case["steps"]
    assert result.main_layer_passes == 3 * sum(map(taylor_full_call, range(case["steps"]))) == 24
    assert [s for s in range(14) if taylor_full_call(s)] == [0, 1, 2, 3, 4, 7, 10, 13]


@pytest.mark.parametrize("name", ["f_teacache_t2i", "f_taylorseer_edit"])
def test_the_parity_check_detects_a_run_without_the_cache(
    golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path, name: str
) -> None:
    """Negative control: uncached, the same case misses the tolerance (TaylorSeer moves the latents ~1e-3)."""
    case = _feature(cases, name)
    result = golden_pipeline(dataclasses.replace(request_from_case(case, golden), cache="none"))
    assert relative_error(result.latents, np.load(golden / case["final_latents"])) > TOLERANCE


def test_an_uncached_run_after_taylorseer_is_unaffected(
    golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path
) -> None:
    """The reference leaves TaylorSeer switched on in its layers after a run; nothing here outlives a request."""
    golden_pipeline(request_from_case(_feature(cases, "f_taylorseer_edit"), golden))
    assert not golden_pipeline.backend.step_cache.entries
    case = next(c for c in cases["pipeline_cases"] if c["name"] == "edit_one_image")
    result = golden_pipeline(request_from_case(case, golden))
    assert relative_error(result.latents, np.load(golden / case["final_latents"])) <= 1e-3


def _denoiser(pipeline: OmniGen2Pipeline, request: GenerationRequest, key: int) -> Denoiser:
    texts = {"prompt": pipeline.encode_prompt(request.prompt, 256)[0]}
    texts["negative"] = pipeline.encode_prompt(request.negative_prompt, 256)[0]
    refs = [
        pipeline.backend.encode_image(preprocess_image(img, request.max_pixels, 1024, "images"))[0]
        for img in request.images
    ]
    gen_size, _ = plan_sizes(request, refs, pipeline.spec)
    return Denoiser(request, texts, refs, gen_size, pipeline.spec, cache_key=key)


def test_cached_and_uncached_requests_share_one_call(
    golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path
) -> None:
    """TeaCache, TaylorSeer and uncached requests, every branch of each, in ONE transformer call per step (as the
    served step batcher merges them): each ends as the reference's own run, and skipped rows leave the layers."""
    requests = [
        request_from_case(_feature(cases, "f_teacache_t2i"), golden),
        request_from_case(_feature(cases, "f_taylorseer_edit"), golden),
        dataclasses.replace(request_from_case(_feature(cases, "f_teacache_t2i"), golden), cache="none"),
    ]
    expected = [np.load(golden / _feature(cases, n)["final_latents"]) for n in ("f_teacache_t2i", "f_taylorseer_edit")]
    denoisers = [_denoiser(golden_pipeline, r, key) for key, r in enumerate(requests, start=1)]
    backend, passes, rows, peak_bytes = golden_pipeline.backend, 0, 0, 0
    with torch.no_grad():
        while not all(d.done for d in denoisers):
            peak_bytes = max(peak_bytes, backend.step_cache.nbytes)
            live = [d for d in denoisers if not d.done]
            samples = [d.samples() for d in live]
            flat = [s for group in samples for s in group]
            packed = pack_samples(flat, golden_pipeline.spec)
            velocity, stats = backend.transformer_cached(packed.as_inputs(), [s.cache for s in flat])
            passes, rows = passes + stats.main_layer_rows, rows + stats.rows
            out = unpack_output(velocity, packed.latent_sizes, golden_pipeline.spec.patch_size)
            start = 0
            for d, group in zip(live, samples, strict=True):
                d.advance(out[start : start + len(group)])
                start += len(group)
    for key in (1, 2, 3):
        backend.step_cache.release(key)
    assert not backend.step_cache.entries
    spec = golden_pipeline.spec
    assert relative_error(spec.unscale(denoisers[0].latents), expected[0]) <= TOLERANCE
    assert relative_error(spec.unscale(denoisers[1].latents), expected[1]) <= TOLERANCE
    uncached = golden_pipeline(requests[2])
    assert relative_error(spec.unscale(denoisers[2].latents), uncached.latents) <= 1e-6
    assert rows == 12 + 42 + 12 and passes == 5 + 24 + 12
    # The state held matches what the BLS reserves: TaylorSeer exactly (5 derivatives of the image tokens of 3
    # branches), TeaCache at most (modulated input over the longest text, image residual, 2 branches); float32.
    hidden = golden_pipeline.spec.hidden_size
    tokens = [d.latents.shape[-1] * d.latents.shape[-2] // 4 for d in denoisers]
    taylor = state_values(Mode.TAYLORSEER, 3, 1, 0, tokens[1], hidden) * 4
    text = max(t.shape[0] for t, _ in denoisers[0]._inputs.values())
    tea = state_values(Mode.TEACACHE, 2, 1, text + tokens[0], tokens[0], hidden) * 4
    assert taylor < peak_bytes <= taylor + tea, (peak_bytes, taylor, tea)


def test_controls_round_trip_the_wire() -> None:
    controls = [Control(7, 17, Mode.TEACACHE, 3, True, 0.02), Control(), Control(9, 0, Mode.RELEASE)]
    assert decode_controls(*encode_controls(controls)) == controls


def test_state_size_and_budget() -> None:
    """At 1024x1024 on the full model (hidden 2520), per request in bf16: what docs/api.md reports."""
    image, text = 4096, 200
    tea = state_values(Mode.TEACACHE, 2, 1, text + image, image, 2520) * 2
    taylor = state_values(Mode.TAYLORSEER, 3, 1, text + 4096 + image, image, 2520) * 2
    assert round(tea / 2**20) == 81 and round(taylor / 2**20) == 295
    budget = CacheBudget(400 * 2**20)
    assert budget.reserve(taylor) and not budget.reserve(taylor)
    budget.release(taylor)
    assert budget.reserve(taylor)


def test_the_budgets_refusal_shows_the_request_past_what_is_left() -> None:
    """Before: "its 1 MiB of cache state would pass the server's 1 MiB" (0.6 MiB rounded, 0.5 MiB held by others)."""
    budget = CacheBudget(2**20)
    assert budget.reserve(2**19) and not budget.reserve(629_146)
    assert budget.refusal(629_146) == (
        "ran uncached: its 0.6 MiB of cache state would pass the 0.5 MiB that the requests in flight leave of the"
        " server's 1 MiB (--max-step-cache-mib)"
    )
    budget.release(2**19)
    assert "its 1.000001 MiB of cache state would pass the 1.000000 MiB" in budget.refusal(2**20 + 1)  # a byte over
    assert "its 2.0 MiB of cache state would pass the 1.0 MiB" in budget.refusal(2**21)
    assert budget.reserve(2**20 - 2**10)  # 1 KiB left
    assert "its 0.010 MiB of cache state would pass the 0.001 MiB" in budget.refusal(10**4)


@pytest.mark.parametrize(
    ("field", "value"), [("cache", "fastcache"), ("teacache_threshold", 0.0), ("teacache_threshold", 1.5)]
)
def test_bad_cache_settings_name_the_field(field: str, value: Any) -> None:
    request = GenerationRequest(prompt="a cat", **{field: value})
    with pytest.raises(InvalidArgumentError) as raised:
        request.validate()
    assert raised.value.field == field


def test_teacache_computes_when_the_accumulated_change_reaches_the_threshold() -> None:
    """The reference skips only while the accumulated change stays strictly under the threshold. A float sum rarely
    lands on the threshold, so the golden TeaCache case cannot tell < from <=: this builds an exact tie."""
    previous, current = np.ones(4), np.full(4, 1.5)  # relative L1 change 0.5
    entry = _Entry()
    entry.tea.modulated, entry.tea.residual = previous, np.zeros(4)
    control = Control(1, 0, Mode.TEACACHE, 1, False, teacache_rescale(0.5))
    decision = _TeaGroup()
    assert not _teacache_skip(decision, control, [entry], [(0, current)])
    assert decision.accumulated == 0.0  # computed: the sum starts over
    above = dataclasses.replace(control, threshold=float(np.nextafter(control.threshold, np.inf)))
    assert _teacache_skip(decision, above, [entry], [(0, current)])


def test_taylorseer_derivatives_reach_the_official_fourth_order() -> None:
    """Orders start at the 5th full call and grow by one per full call up to max_order 4. The golden TaylorSeer case
    (14 steps) reaches order 4 only at its last step and never extrapolates from it, so capping the orders at 3
    passed every parity test."""
    entry = _TaylorEntry()
    orders = []
    for step in [s for s in range(20) if taylor_full_call(s)]:  # 0-4, 7, 10, 13, 16, 19
        _taylor_update(entry, np.full(2, float(step) ** 2), step)
        orders.append(len(entry.factors) - 1)
    assert orders == [0, 0, 0, 0, 1, 2, 3, 4, 4, 4]
