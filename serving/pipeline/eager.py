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

from serving.pipeline.guidance import Branch, combine, step_guidance
from serving.pipeline.images import generation_size, postprocess, preprocess_image
from serving.pipeline.packing import pack_batch, unpack_output
from serving.pipeline.prompts import PromptTokenizer
from serving.pipeline.request import DEFAULT_LIMITS, GenerationRequest, Limits
from serving.pipeline.schedulers import SchedulerKind, dpm_solver_step, euler_step, timesteps
from serving.runtime.base import ComponentBackend, ModelSpec

ProgressCallback = Callable[[int, int], None]


def initial_noise(seed: int, count: int, height: int, width: int, spec: ModelSpec) -> torch.Tensor:
    """The reference's CPU noise: the same seed gives the same image as the official pipeline."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (count, spec.latent_channels, height // spec.vae_scale, width // spec.vae_scale)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


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
        n = request.num_images_per_prompt

        prompts = [request.prompt]
        if request.text_guidance_scale > 1.0:
            prompts.append(request.negative_prompt)
        encoded = []
        for prompt in prompts:
            ids, mask = self.tokenizer([prompt])
            encoded.append((backend.encode_text(ids, mask), mask))
        clock = _lap(timings, "text_encode", clock)

        ref_latents = [
            backend.encode_image(
                preprocess_image(img, request.max_pixels, request.max_input_image_side_length, field=f"images[{i}]")
            )[0]
            for i, img in enumerate(request.images)
        ]
        clock = _lap(timings, "vae_encode", clock)

        ref_sizes = [(r.shape[1] * spec.vae_scale, r.shape[2] * spec.vae_scale) for r in ref_latents]
        (gen_h, gen_w), (out_h, out_w) = generation_size(request.width, request.height, request.max_pixels, ref_sizes)
        latents = initial_noise(request.seed, n, gen_h, gen_w, spec)
        grid = timesteps(request.steps, latents.shape[-2], latents.shape[-1])

        branch_inputs = {
            Branch.COND: (encoded[0], ref_latents or None),
            Branch.REF: (encoded[-1], ref_latents or None),
            Branch.UNCOND: (encoded[-1], None),
        }
        previous_x0: torch.Tensor | None = None
        for i in range(request.steps):
            guidance = step_guidance(
                i,
                request.steps,
                request.text_guidance_scale,
                request.image_guidance_scale,
                request.cfg_range,
                has_refs=bool(ref_latents),
            )
            preds = {branch: self._velocity(latents, grid[i], *branch_inputs[branch]) for branch in guidance.branches}
            velocity = combine(guidance, preds)
            if request.scheduler == SchedulerKind.DPMSOLVER.value:
                latents, previous_x0 = dpm_solver_step(latents, velocity, grid, i, previous_x0)
            else:
                latents = euler_step(latents, velocity, grid, i)
            if progress is not None:
                progress(i + 1, request.steps)
        clock = _lap(timings, "denoise", clock)

        images = postprocess(backend.decode(latents), out_h, out_w)
        _lap(timings, "vae_decode", clock)
        unscaled = latents / spec.vae_scaling_factor + spec.vae_shift_factor
        return GenerationResult(images=images, latents=unscaled, seed=request.seed, timings=timings)

    def _velocity(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor],
        refs: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        n = latents.shape[0]
        feats, mask = text
        # One reference slot at least: the graphs take no zero-size dimension (TensorRT cannot).
        packed = pack_batch(
            list(latents),
            t.expand(n),
            feats.expand(n, -1, -1),
            mask.expand(n, -1),
            [refs] * n,
            patch_size=self.spec.patch_size,
            axes_dim=self.spec.axes_dim_rope,
            min_ref_slots=1,
        )
        velocity = self.backend.transformer(packed.as_inputs())
        return torch.stack(unpack_output(velocity, packed.latent_sizes, self.spec.patch_size))


def _lap(timings: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    timings[stage] = now - since
    return now
