"""TensorRT engine building: profiles cover the serving limits; on a machine without a GPU it says so."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

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
    assert DEFAULT_LIMITS.max_pixels == 2048 * 2048 and DEFAULT_LIMITS.max_input_images == 5
    transformer = shapes["transformer"]
    assert transformer["img_tokens"][2] == (24, 128 * 128, 64)  # 2048x2048 pixels: a 128x128 grid of 2x2 patches
    assert transformer["ref_tokens"][2] == (24, 5, 64 * 64, 64)  # 5 references of at most 1024x1024
    assert transformer["text_feats"][2] == (24, 1024, 2048)
    # 1024 text + 5 x 4096 reference + 16384 image tokens; head_dim / 2 = 60 in the full model.
    assert transformer["rope_cos"][2] == transformer["rope_sin"][2] == (24, 37_888, 60)
    assert transformer["rope_cos"][1] == (6, 128 + 4096 + 4096, 60)
    assert shapes["vae_encoder"]["image"][2] == (5, 3, 2048, 2048)
    assert shapes["vae_decoder"]["latents"][2] == (8, 16, 256, 256)  # one request's 8 images at 2048x2048


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


@pytest.mark.parametrize(
    ("tensorrt", "message"),
    [(None, "TensorRT is not installed"), (types.ModuleType("tensorrt"), "this machine has none")],
)
def test_without_tensorrt_or_a_gpu_it_reports_clearly(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tensorrt: types.ModuleType | None,
    message: str,
) -> None:
    """Without TensorRT, or with it but no CUDA device, the command explains and exits 2 instead of crashing.
    Both are simulated, so the test runs (and means the same) on machines with and without a GPU."""
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)  # None: `import tensorrt` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--onnx", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("build_engines: ") and message in err
    assert not any(tmp_path.iterdir())  # nothing half-built
