"""The eager in-process pipeline: the correctness reference and the performance baseline.

Like the reference scripts it runs each CFG branch as its own transformer call; the served stack batches
branches and requests instead, and is measured against this class.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from serving.pipeline.denoise import Denoiser, pack_samples
from serving.pipeline.images import generation_size, postprocess, preprocess_image
from serving.pipeline.packing import unpack_output
from serving.pipeline.prompts import PromptTokenizer
from serving.pipeline.request import DEFAULT_LIMITS, GenerationRequest, Limits
from serving.runtime.base import ComponentBackend

ProgressCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    images: np.ndarray  # (n, H, W, 3) float32 in [0, 1]
    latents: torch.Tensor  # (n, 16, h, w) final latents as handed to the VAE decoder (unscaled)
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class OmniGen2Pipeline:
    def __init__(self, tokenizer: PromptTokenizer, backend: ComponentBackend, limits: Limits = DEFAULT_LIMITS) -> None:
        self.tokenizer = tokenizer
        self.backend = backend
        self.spec = backend.spec
        self.limits = limits

    @classmethod
    def from_pretrained(cls, checkpoint: Path | str, limits: Limits = DEFAULT_LIMITS) -> OmniGen2Pipeline:
        """PyTorch components from a checkpoint in the official layout."""
        from serving.runtime.torch_backend import TorchBackend

        checkpoint = Path(checkpoint)
        backend = TorchBackend.from_checkpoint(checkpoint)
        return cls(PromptTokenizer.from_dir(checkpoint / "processor"), backend, limits)

    @classmethod
    def from_onnx(cls, export_dir: Path | str, limits: Limits = DEFAULT_LIMITS, threads: int = 0) -> OmniGen2Pipeline:
        """ONNX Runtime components from `export.onnx_export`'s output folder."""
        from serving.runtime.onnx_backend import OnnxBackend

        export_dir = Path(export_dir)
        backend = OnnxBackend(export_dir, threads=threads)
        return cls(PromptTokenizer.from_dir(export_dir / "processor"), backend, limits)

    @torch.no_grad()
    def __call__(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        request.validate(self.limits)
        spec, backend = self.spec, self.backend
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        texts = {"prompt": self.encode_prompt(request.prompt)}
        if request.text_guidance_scale > 1.0:
            texts["negative"] = self.encode_prompt(request.negative_prompt)
        clock = _lap(timings, "text_encode", clock)

        ref_latents = [
            backend.encode_image(
                preprocess_image(img, request.max_pixels, request.max_input_image_side_length, field=f"images[{i}]")
            )[0]
            for i, img in enumerate(request.images)
        ]
        clock = _lap(timings, "vae_encode", clock)

        ref_sizes = [(r.shape[1] * spec.vae_scale, r.shape[2] * spec.vae_scale) for r in ref_latents]
        gen_size, (out_h, out_w) = generation_size(request.width, request.height, request.max_pixels, ref_sizes)
        denoiser = Denoiser(request, texts, ref_latents, gen_size, spec)
        while not denoiser.done:
            samples = denoiser.samples()
            velocities: list[torch.Tensor] = []
            # Like the reference: one transformer call per CFG branch (the served stack batches them all).
            for branch in dict.fromkeys(s.branch for s in samples):
                packed = pack_samples([s for s in samples if s.branch == branch], spec)
                velocities += unpack_output(
                    backend.transformer(packed.as_inputs()), packed.latent_sizes, spec.patch_size
                )
            denoiser.advance(velocities)
            if progress is not None:
                progress(denoiser.step, request.steps)
        clock = _lap(timings, "denoise", clock)

        images = postprocess(backend.decode(denoiser.latents), out_h, out_w)
        _lap(timings, "vae_decode", clock)
        return GenerationResult(
            images=images, latents=spec.unscale(denoiser.latents), seed=request.seed, timings=timings
        )

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Unpadded (L, D) features of one templated prompt."""
        ids, mask = self.tokenizer([prompt])
        return self.backend.encode_text(ids, mask)[0, : int(mask.sum())]


def _lap(timings: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    timings[stage] = now - since
    return now
