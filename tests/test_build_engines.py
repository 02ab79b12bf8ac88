"""TensorRT engine building: profiles cover the serving limits; on a machine without a GPU it says so."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from serving.artifacts import repository
from serving.artifacts.engines import ProfileBounds, cache_key, main, profiles
from serving.model.spec import ModelSpec
from serving.pipeline.denoise import Sample, plan_sizes, sample_shape
from serving.pipeline.guidance import Branch
from serving.pipeline.images import fit_size
from serving.pipeline.request import DEFAULT_LIMITS, GenerationRequest

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
    assert transformer["ref_tokens"][2] == (24, 5, 128 * 128, 64)  # 5 references fitted to max_pixels 2048x2048
    assert transformer["text_feats"][2] == (24, 1024, 2048)
    # 1024 text + 5 x 16384 reference + 16384 image tokens; head_dim / 2 = 60 in the full model.
    assert transformer["rope_cos"][2] == transformer["rope_sin"][2] == (24, 99_328, 60)
    assert transformer["rope_cos"][1] == (6, 128 + 4096 + 4096, 60)
    assert shapes["vae_encoder"]["image"][2] == (5, 3, 4096, 4096)  # a 4096x16 reference is admitted
    assert shapes["vae_decoder"]["latents"][2] == (8, 16, 512, 512)  # 8 images of 4096x1024 (or 1024x4096)
    assert "text_encoder" not in shapes  # prompts are encoded by the mllm model


def test_cache_key_changes_with_what_changes_the_engine() -> None:
    shapes = profiles(ProfileBounds.from_limits(), SPEC, 2048)
    export = {"format_version": 3, "opset": 20, "torch": "2.13.0", "dtype": "bfloat16"}
    variants = [
        ("abc", export, "H100", "10.9", "bf16"),
        ("abd", export, "H100", "10.9", "bf16"),
        ("abc", export | {"format_version": 4}, "H100", "10.9", "bf16"),  # another image's graphs
        ("abc", export, "H200", "10.9", "bf16"),
        ("abc", export, "H100", "10.10", "bf16"),
        ("abc", export, "H100", "10.9", "fp16"),
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


def test_the_repository_generator_refuses_tensorrt_before_exporting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """`python -m serving.artifacts.repository --backend tensorrt` starts no server, so it checks what it needs itself:
    without TensorRT (simulated, as above) it stops in one line before the ONNX export, not minutes after it."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    argv = ["--checkpoint", str(tiny_checkpoint), "--backend", "tensorrt", "--out", str(tmp_path / "repo")]
    with pytest.raises(SystemExit, match=r"^prepare_repository: backend: TensorRT is not installed"):
        repository.main([*argv, "--onnx-cache", str(tmp_path / "onnx")])
    assert not any(tmp_path.iterdir())


def test_a_tensorrt_repository_is_rebuilt_for_another_gpu_or_tensorrt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Path, tiny_onnx_whole: Path
) -> None:
    """A kept model volume (compose) must not serve engines built for another GPU model or TensorRT version: those
    are part of the repository's key, so only an unchanged platform makes a rerun a no-op. No engine is built here
    (no GPU): the build writes placeholder plans."""
    builds: list[str] = []

    def build(onnx_dir: Path, out: Path, precision: str, bounds: ProfileBounds) -> Path:
        builds.append(platform["gpu"])
        for name in repository.SERVED_GRAPHS:
            (out / f"{name}.plan").parent.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.plan").write_bytes(b"plan")
        return out

    platform = {"gpu": "NVIDIA H100 80GB HBM3", "tensorrt": "10.14.1"}
    monkeypatch.setattr(repository, "engine_platform", lambda: dict(platform))
    monkeypatch.setattr(repository, "build_engines", build)

    def prepare() -> None:
        onnx = tiny_onnx_whole.parent  # holds the whole transformer, which the engines are built from
        repository.prepare_repository(
            tiny_checkpoint, tmp_path / "repo", "tensorrt", onnx, tmp_path / "engines", precision="bf16"
        )

    prepare()
    prepare()
    assert builds == ["NVIDIA H100 80GB HBM3"]
    assert (tmp_path / "repo" / "transformer" / "1" / "model.plan").read_bytes() == b"plan"
    platform["gpu"] = "NVIDIA H200"
    prepare()
    assert builds == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]


def _admitted_corners() -> list[GenerationRequest]:
    """Requests at the edges of what validation admits: sizes, aspect ratios, references, text and image counts."""
    limits = DEFAULT_LIMITS
    side, pixels = limits.max_side, limits.max_pixels
    sizes = [(1, 1), (16, 16), (side, 16), (16, side), (side, pixels // side), (pixels // side, side), (side, side)]
    requests = []
    for width, height in sizes:
        for refs in (0, 1, limits.max_input_images):
            # A reference of the largest admitted shape; its size is what the pipeline fits to the request.
            images = [Image.new("RGB", (width or 16, height or 16)) for _ in range(refs)]
            for explicit in (True, False):
                request = GenerationRequest(
                    prompt="x",
                    images=images,
                    width=width if explicit else None,
                    height=height if explicit else None,
                    num_images_per_prompt=limits.max_images_per_prompt,
                    max_pixels=pixels,
                    max_input_image_side_length=side,
                    max_sequence_length=limits.max_sequence_length,
                )
                assert not request.violations(limits), request
                requests.append(request)
    return requests


def test_no_admitted_request_falls_outside_the_profiles() -> None:
    """Walk the corners of the admitted limits through the pipeline's own size planning: every reference the
    VAE encoder sees, every transformer sample and every decode lies inside its engine's profile."""
    spec = ModelSpec(patch_size=2, axes_dim_rope=(40, 40, 40), vae_scaling_factor=0.3611, vae_shift_factor=0.1159)
    shapes = profiles(ProfileBounds.from_limits(), SPEC, text_dim=2048)

    def inside(graph: str, tensor: str, shape: tuple[int, ...]) -> None:
        low, _opt, high = shapes[graph][tensor]
        assert all(a <= s <= b for a, s, b in zip(low, shape, high, strict=True)), (graph, tensor, shape, high)

    for request in _admitted_corners():
        refs = []
        for image in request.images:
            height, width = fit_size(image.height, image.width, request.max_pixels, request.max_input_image_side_length)
            height, width = max(height, 16), max(width, 16)
            inside("vae_encoder", "image", (len(request.images), 3, height, width))
            refs.append(torch.zeros(16, height // 8, width // 8))
        (gen_h, gen_w), _out = plan_sizes(request, refs, spec)
        inside("vae_decoder", "latents", (request.num_images_per_prompt, 16, gen_h // 8, gen_w // 8))
        text = request.sequence_length(text_positions=1024)
        sample = Sample(
            Branch.COND, torch.zeros(16, gen_h // 8, gen_w // 8), torch.tensor(0.5), torch.zeros(text, 1), tuple(refs)
        )
        shape = sample_shape(sample, spec.patch_size)
        batch = ProfileBounds.from_limits().max_batch
        inside("transformer", "img_tokens", (batch, shape.image, 64))
        inside("transformer", "text_feats", (batch, shape.text, 2048))
        ref_len = max(shape.refs, default=1)
        inside("transformer", "ref_tokens", (batch, max(len(refs), 1), ref_len, 64))
        inside("transformer", "rope_cos", (batch, shape.text + max(len(refs), 1) * ref_len + shape.image, 60))
