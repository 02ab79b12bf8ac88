"""ONNX graphs (from export.onnx_export) -> TensorRT engines, one per component, cached.

    python -m export.build_engines --onnx build/onnx/full --out build/engines --precision bf16

Optimisation profiles (min/opt/max per dynamic axis) come from the serving limits, so an engine accepts every
request the front end admits. Engines are cached under a key made of the checkpoint hash, the ONNX export's
settings, the GPU name, the TensorRT version, the precision and the profiles: a rebuild happens only when one of
them changes. The cache may
be shared by pods starting together (a ReadWriteMany volume): one of them builds each engine while the others wait
for it, at most --wait seconds (serving/artifacts/cache_lock.py).
TensorRT needs an NVIDIA GPU; elsewhere this command says so and exits with status 2.

Precision: fp16 / bf16 let TensorRT pick reduced-precision kernels. fp8 is refused: it needs graphs with Q/DQ
quantisation (e.g. made with NVIDIA ModelOpt), which this project does not make yet.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.artifacts.cache_lock import CacheLockTimeoutError, build_once
from serving.errors import SettingError
from serving.pipeline.request import DEFAULT_LIMITS, Limits
from serving.runtime.onnx_backend import read_manifest

log = logging.getLogger("export.engines")
PRECISIONS = ("fp32", "fp16", "bf16")
# How long a pod waits for another one's build of an engine before giving up: a full-size transformer takes many
# minutes, and a dead builder frees its lock at once (a vanished node: within the NFS lease).
BUILD_WAIT_S = 3600.0
Shape = tuple[int, ...]


class GpuUnavailableError(SettingError):
    """TensorRT or a CUDA device is missing: the `tensorrt` backend cannot be chosen on this machine."""

    def __init__(self, message: str) -> None:
        super().__init__("backend", message)


@dataclass(frozen=True)
class ProfileBounds:
    """Largest shapes one engine call must take, derived from the request limits, so that no request the API
    admits falls outside a profile (tests/test_build_engines.py walks the corners)."""

    max_batch: int  # samples per transformer call: requests x CFG branches (the BLS's max_samples)
    opt_batch: int
    max_text: int  # prompts are cut to max_sequence_length tokens, chat template included
    opt_text: int
    max_img_tokens: int  # the generated latent, bounded by max_pixels
    opt_img_tokens: int
    max_ref_tokens: int  # a reference is fitted to the request's max_pixels, itself bounded by the limit
    max_refs: int
    max_side: int  # pixels per side for the VAE graphs: sides go up to the limit when the other is short
    max_images: int  # images of one request, decoded together

    @classmethod
    def from_limits(cls, limits: Limits = DEFAULT_LIMITS, max_batch: int = 24, patch: int = 2) -> ProfileBounds:
        cell = 8 * patch  # pixels per token side
        tokens = limits.max_pixels // cell**2
        return cls(
            max_batch=max_batch,
            opt_batch=6,  # two requests with three CFG branches each
            max_text=limits.max_sequence_length,
            opt_text=128,
            max_img_tokens=tokens,
            opt_img_tokens=(1024 // cell) ** 2,
            max_ref_tokens=tokens,
            max_refs=limits.max_input_images,
            max_side=limits.max_side,
            max_images=limits.max_images_per_prompt,
        )


def profiles(bounds: ProfileBounds, spec: dict[str, Any], text_dim: int) -> dict[str, dict[str, tuple[Shape, ...]]]:
    """(min, opt, max) shape per input of every graph."""
    b = bounds
    p = spec["patch_size"] ** 2 * spec["latent_channels"]
    half = sum(spec["axes_dim_rope"]) // 2
    opt_seq = b.opt_text + b.opt_img_tokens + b.opt_img_tokens
    max_seq = b.max_text + b.max_refs * b.max_ref_tokens + b.max_img_tokens
    latent_side = b.max_side // spec["vae_scale"]
    # No text_encoder engine: prompts are encoded by the `mllm` model, on the one Qwen2.5-VL of the stack.
    return {
        "transformer": {
            "img_tokens": ((1, 1, p), (b.opt_batch, b.opt_img_tokens, p), (b.max_batch, b.max_img_tokens, p)),
            "img_mask": ((1, 1), (b.opt_batch, b.opt_img_tokens), (b.max_batch, b.max_img_tokens)),
            "timestep": ((1,), (b.opt_batch,), (b.max_batch,)),
            "text_feats": ((1, 1, text_dim), (b.opt_batch, b.opt_text, text_dim), (b.max_batch, b.max_text, text_dim)),
            "text_mask": ((1, 1), (b.opt_batch, b.opt_text), (b.max_batch, b.max_text)),
            "ref_tokens": (
                (1, 1, 1, p),
                (b.opt_batch, 1, b.opt_img_tokens, p),
                (b.max_batch, b.max_refs, b.max_ref_tokens, p),
            ),
            "ref_mask": ((1, 1, 1), (b.opt_batch, 1, b.opt_img_tokens), (b.max_batch, b.max_refs, b.max_ref_tokens)),
            "rope_cos": ((1, 3, half), (b.opt_batch, opt_seq, half), (b.max_batch, max_seq, half)),
            "rope_sin": ((1, 3, half), (b.opt_batch, opt_seq, half), (b.max_batch, max_seq, half)),
        },
        "vae_encoder": {"image": ((1, 3, 16, 16), (1, 3, 1024, 1024), (b.max_refs, 3, b.max_side, b.max_side))},
        "vae_decoder": {"latents": ((1, 16, 2, 2), (1, 16, 128, 128), (b.max_images, 16, latent_side, latent_side))},
    }


def manifest_profiles(manifest: dict[str, Any], bounds: ProfileBounds) -> dict[str, dict[str, tuple[Shape, ...]]]:
    """`profiles` for the graphs an ONNX export's manifest describes. The text features' width: the text encoder's
    output, or the transformer's input where the export holds no text encoder (TensorRT's needs none)."""
    graphs = manifest["graphs"]
    tensors = graphs["text_encoder"]["outputs"] if "text_encoder" in graphs else graphs["transformer"]["inputs"]
    text_dim = next(t for t in tensors if t["name"] == "text_feats")["shape"][-1]
    return profiles(bounds, manifest["spec"], int(text_dim))


def engine_max_batch(shapes: dict[str, tuple[Shape, ...]]) -> int:
    """The largest batch one graph's engine takes: the smallest batch bound over its inputs' max shapes."""
    return min(high[0] for _low, _opt, high in shapes.values())


def cache_key(
    checkpoint_sha256: str,
    export_settings: dict[str, Any],
    gpu: str,
    trt_version: str,
    precision: str,
    shapes: dict[str, Any],
) -> str:
    """Everything an engine is built from. The export's settings (format version, opset, torch, dtype) are in it:
    a cache that outlives the image (the shared volume) must not serve engines built from an older image's graphs."""
    material = json.dumps([checkpoint_sha256, export_settings, gpu, trt_version, precision, shapes], sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def require_tensorrt() -> Any:
    """Import TensorRT and check for a CUDA device, or explain why engines cannot be built here."""
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        raise GpuUnavailableError(f"TensorRT is not installed ({exc}); engines are built on a GPU machine") from exc
    if not torch.cuda.is_available():
        raise GpuUnavailableError(
            "TensorRT needs an NVIDIA GPU and this machine has none; use the ONNX Runtime backend"
        )
    return trt


def engine_platform() -> dict[str, str]:
    """What engines are built for besides their graphs: the GPU model and the TensorRT version (both must exist)."""
    trt = require_tensorrt()
    import torch

    return {"gpu": torch.cuda.get_device_name(0), "tensorrt": trt.__version__}


def build_engine(trt: Any, onnx_path: Path, plan: Path, precision: str, shapes: dict[str, tuple[Shape, ...]]) -> None:
    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    flags = {"fp16": ["FP16"], "bf16": ["BF16"]}.get(precision, [])
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    plan.write_bytes(bytes(serialized))  # the aside path of build_once: renamed into place once written


def _write_aside(path: Path, text: str) -> None:
    """Replace `path` whole: pods sharing the cache write the same file, and a reader must never see half of it."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep it from a pod running as another user
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(temp, path)


def build_engines(
    onnx_dir: Path, out: Path, precision: str, bounds: ProfileBounds, wait_s: float = BUILD_WAIT_S
) -> Path:
    trt = require_tensorrt()
    import torch

    manifest = read_manifest(onnx_dir)
    shapes = manifest_profiles(manifest, bounds)
    gpu = torch.cuda.get_device_name(0)
    key = cache_key(manifest["checkpoint_sha256"], manifest["settings"], gpu, trt.__version__, precision, shapes)
    target = out / key
    target.mkdir(parents=True, exist_ok=True)
    for name in shapes:
        onnx_path = onnx_dir / manifest["graphs"][name]["file"]
        build = functools.partial(build_engine, trt, onnx_path, precision=precision, shapes=shapes[name])
        started = time.perf_counter()
        if build_once(target / f"{name}.plan", build, wait_s, what=name):
            log.info("%s: built in %.0f s", name, time.perf_counter() - started)
        else:
            log.info("%s: cached in %s", name, target)
    info = {"key": key, "gpu": gpu, "tensorrt": trt.__version__, "precision": precision, "bounds": asdict(bounds)}
    _write_aside(target / "engines.json", json.dumps({**info, "profiles": shapes}, indent=2))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True, help="output folder of export.onnx_export")
    parser.add_argument("--out", type=Path, default=Path("build/engines"))
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--max-batch", type=int, default=24, help="samples per transformer call")
    parser.add_argument(
        "--wait", type=float, default=BUILD_WAIT_S, help="seconds to wait for another builder of the same engine"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bounds = ProfileBounds.from_limits(max_batch=args.max_batch)
    try:
        target = build_engines(args.onnx, args.out, args.precision, bounds, args.wait)
    except GpuUnavailableError as exc:
        print(f"build_engines: {exc.description}", file=sys.stderr)
        return 2
    except CacheLockTimeoutError as exc:
        print(f"build_engines: {exc}", file=sys.stderr)
        return 1
    print(f"TensorRT engines in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
