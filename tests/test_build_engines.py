"""TensorRT engine building: profiles cover the serving limits; on a machine without a GPU it says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.build_engines import ProfileBounds, cache_key, main, profiles
from serving.pipeline.request import DEFAULT_LIMITS

SPEC = {"patch_size": 2, "latent_channels": 16, "axes_dim_rope": [40, 40, 40], "vae_scale": 8}


def test_profiles_are_ordered_and_cover_the_limits() -> None:
    bounds = ProfileBounds.from_limits()
    shapes = profiles(bounds, SPEC, text_dim=2048)
    for graph, inputs in shapes.items():
        for name, (low, opt, high) in inputs.items():
            assert len(low) == len(opt) == len(high), f"{graph}.{name}"
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)), f"{graph}.{name}"
    transformer = shapes["transformer"]
    side = int(DEFAULT_LIMITS.max_pixels**0.5)
    assert transformer["img_tokens"][2][1] == (side // 16) ** 2  # the largest generation the front end admits
    assert transformer["ref_tokens"][2][1] == DEFAULT_LIMITS.max_input_images
    assert transformer["rope_cos"][2][2] == 60  # head_dim / 2 of the full model
    max_seq = bounds.max_text + bounds.max_refs * bounds.max_ref_tokens + bounds.max_img_tokens
    assert transformer["rope_cos"][2][1] == max_seq


def test_cache_key_changes_with_what_changes_the_engine() -> None:
    shapes = profiles(ProfileBounds.from_limits(), SPEC, 2048)
    variants = [
        ("abc", "H100", "10.9", "bf16"),
        ("abd", "H100", "10.9", "bf16"),
        ("abc", "H200", "10.9", "bf16"),
        ("abc", "H100", "10.10", "bf16"),
        ("abc", "H100", "10.9", "fp16"),
    ]
    keys = [cache_key(*v, shapes) for v in variants]
    assert keys[0] == cache_key(*variants[0], shapes)
    assert len(set(keys)) == len(variants)


def test_without_a_gpu_it_reports_clearly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """This CI machine has no GPU (and no TensorRT): the command must explain and exit 2, not crash."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CPU-only message does not apply")
    assert main(["--onnx", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "GPU" in capsys.readouterr().err
