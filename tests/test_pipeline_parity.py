"""The eager pipeline reproduces the reference's final latents and images on every golden case."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.pipeline.eager import OmniGen2Pipeline
from tests.golden import relative_error, request_from_case

LATENT_TOLERANCE = 1e-3
IMAGE_TOLERANCE = 2e-3

CASE_NAMES = ["t2i_euler", "edit_one_image", "in_context_two_images", "t2i_dpmsolver_cfgrange"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_pipeline_case(
    golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path, name: str
) -> None:
    case = next(c for c in cases["pipeline_cases"] if c["name"] == name)
    steps_seen: list[tuple[int, int]] = []
    result = golden_pipeline(request_from_case(case, golden), progress=lambda i, n: steps_seen.append((i, n)))

    expected_latents = np.load(golden / case["final_latents"])
    expected_images = np.load(golden / case["output"])
    assert result.latents.shape == expected_latents.shape
    assert relative_error(result.latents, expected_latents) <= LATENT_TOLERANCE
    assert list(result.images.shape) == case["output_shape"]
    assert float(np.abs(result.images - expected_images).max()) <= IMAGE_TOLERANCE
    assert steps_seen == [(i + 1, case["steps"]) for i in range(case["steps"])]
    assert set(result.timings) == {"text_encode", "vae_encode", "denoise", "vae_decode"}


def test_parity_check_detects_a_different_schedule(
    golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path
) -> None:
    """Negative control: the other scheduler on the same case must miss the tolerance."""
    case = next(c for c in cases["pipeline_cases"] if c["name"] == "t2i_dpmsolver_cfgrange")
    request = dataclasses.replace(request_from_case(case, golden), scheduler="euler")
    result = golden_pipeline(request)
    assert relative_error(result.latents, np.load(golden / case["final_latents"])) > LATENT_TOLERANCE


FEATURE_LATENT_TOLERANCE = 1e-5
FEATURE_IMAGE_TOLERANCE = 1e-4
FEATURE_CASES = ["f_five_images", "f_two_per_prompt", "f_long_prompt_truncated", "f_teacache_t2i", "f_taylorseer_edit"]


def _feature_case(cases: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cases["feature_cases"] if c["name"] == name)


@pytest.mark.parametrize("name", FEATURE_CASES)
def test_golden_feature_case(golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path, name: str) -> None:
    case = _feature_case(cases, name)
    result = golden_pipeline(request_from_case(case, golden))

    expected_latents = np.load(golden / case["final_latents"])
    assert result.latents.shape == expected_latents.shape
    assert relative_error(result.latents, expected_latents) <= FEATURE_LATENT_TOLERANCE
    assert list(result.images.shape) == case["output_shape"]
    assert float(np.abs(result.images - np.load(golden / case["output"])).max()) <= FEATURE_IMAGE_TOLERANCE
    assert (result.truncated_prompt_tokens > 0) == ("max_sequence_length" in case)
    assert result.truncated_negative_prompt_tokens == 0


def test_feature_parity_detects_an_untruncated_prompt(
    golden_pipeline: OmniGen2Pipeline, cases: dict[str, Any], golden: Path
) -> None:
    """Negative control: the long prompt at the default length (the checkpoint's 512) must miss the tolerance."""
    case = _feature_case(cases, "f_long_prompt_truncated")
    result = golden_pipeline(dataclasses.replace(request_from_case(case, golden), max_sequence_length=None))
    assert relative_error(result.latents, np.load(golden / case["final_latents"])) > FEATURE_LATENT_TOLERANCE
