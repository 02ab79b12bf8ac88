"""The eager in-process pipeline: the correctness reference and the performance baseline.

Like the reference scripts it runs each CFG branch as its own transformer call (`batch_branches=False`); the
served stack batches branches and requests instead, and is measured against this class. `batch_branches=True`
groups the branches of a step into calls as the BLS does (serving/pipeline/grouping.py: one call, unless padding a
branch to the others would cost more than a call of its own, as an edit's branch without the reference would),
for in-process measurements of that change alone.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from serving.pipeline.denoise import Denoiser, Sample, pack_samples, plan_sizes, prompts_for, sample_shape
from serving.pipeline.grouping import CALL_OVERHEAD_MS, CallCost, SampleShape, padded_tokens, plan_calls
from serving.pipeline.image_tensors import postprocess, preprocess_image
from serving.pipeline.packing import unpack_output
from serving.pipeline.prompts import PromptTokenizer
from serving.pipeline.request import DEFAULT_LIMITS, GenerationRequest, Limits
from serving.pipeline.timing import Stopwatch
from serving.runtime.base import ComponentBackend

if TYPE_CHECKING:
    from serving.runtime.fast_path import FastPath

ProgressCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    images: np.ndarray  # (n, H, W, 3) float32 in [0, 1]
    latents: torch.Tensor  # (n, 16, h, w) final latents as handed to the VAE decoder (unscaled)
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    truncated_prompt_tokens: int = 0  # tokens cut at max_sequence_length (chat template included)
    truncated_negative_prompt_tokens: int = 0
    main_layer_passes: int = 0  # rows (branch x image) that ran the main layers over all steps (step caching)


class OmniGen2Pipeline:
    def __init__(
        self,
        tokenizer: PromptTokenizer,
        backend: ComponentBackend,
        limits: Limits = DEFAULT_LIMITS,
        batch_branches: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.backend = backend
        self.spec = backend.spec
        self.limits = limits
        self.batch_branches = batch_branches
        # What a transformer call costs beside its tokens, learnt from the calls as the BLS learns it
        self.call_cost = CallCost(fixed_s=CALL_OVERHEAD_MS / 1000)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: Path | str,
        limits: Limits = DEFAULT_LIMITS,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        fast: FastPath | None = None,
        batch_branches: bool = False,
    ) -> OmniGen2Pipeline:
        """PyTorch components from a checkpoint in the official layout, weights in `dtype` (bf16 as served) on
        `device` (`auto`: CUDA when present), the transformer on the `fast` path (default: the reference's way).
        Latents, noise and the solver stay on the CPU in float32, as the contract says, so a seed gives the same
        noise on any device."""
        from serving.model.devices import check_dtype, resolve_device
        from serving.runtime.torch_backend import TorchBackend

        checkpoint = Path(checkpoint)
        where = resolve_device(device)
        check_dtype(where, dtype)
        backend = TorchBackend.from_checkpoint(checkpoint, dtype, where, fast)
        return cls(PromptTokenizer.from_dir(checkpoint / "processor"), backend, limits, batch_branches)

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
        max_length = request.sequence_length(spec.text_positions)
        watch = Stopwatch()
        encoded = {key: self.encode_prompt(prompt, max_length) for key, prompt in prompts_for(request).items()}
        texts = {key: features for key, (features, _) in encoded.items()}
        truncated = {key: cut for key, (_, cut) in encoded.items()}
        watch.lap("text_encode")

        ref_latents = [
            backend.encode_image(
                preprocess_image(img, request.max_pixels, request.max_input_image_side_length, field=f"images[{i}]")
            )[0]
            for i, img in enumerate(request.images)
        ]
        watch.lap("vae_encode")

        gen_size, (out_h, out_w) = plan_sizes(request, ref_latents, spec)
        # A key of its own: calls sharing this pipeline (and its backend's cache store) keep their states apart.
        denoiser = Denoiser(request, texts, ref_latents, gen_size, spec, cache_key=secrets.randbits(62))
        passes = 0
        try:
            while not denoiser.done:
                samples = denoiser.samples()
                velocities: dict[int, torch.Tensor] = {}
                for call in self._calls(samples):
                    rows = [samples[i] for i in call]
                    packed = pack_samples(rows, spec)
                    started = time.perf_counter()
                    velocity, stats = backend.transformer_cached(packed.as_inputs(), [s.cache for s in rows])
                    self.call_cost.observe(padded_tokens(self._shapes(rows)), time.perf_counter() - started)
                    passes += stats.main_layer_rows
                    velocities.update(
                        zip(call, unpack_output(velocity, packed.latent_sizes, spec.patch_size), strict=True)
                    )
                denoiser.advance([velocities[i] for i in range(len(samples))])
                if progress is not None:
                    progress(denoiser.step, request.steps)
        finally:  # a request's cache state goes with it, however it ends
            backend.step_cache.release(denoiser.cache_key)
        watch.lap("denoise")

        images = postprocess(backend.decode(denoiser.latents), out_h, out_w)
        watch.lap("vae_decode")
        return GenerationResult(
            images,
            spec.unscale(denoiser.latents),
            request.seed,
            watch.timings,
            truncated_prompt_tokens=truncated["prompt"],
            truncated_negative_prompt_tokens=truncated.get("negative", 0),
            main_layer_passes=passes,
        )

    def _calls(self, samples: list[Sample]) -> list[list[int]]:
        """The step's samples (indices) per transformer call: one per CFG branch as the reference runs them, or
        grouped as the BLS groups them (`batch_branches`)."""
        if self.batch_branches:
            return plan_calls(self._shapes(samples), self.call_cost.overhead_tokens)
        branches = [s.branch for s in samples]
        return [[i for i, b in enumerate(branches) if b == branch] for branch in dict.fromkeys(branches)]

    def _shapes(self, samples: list[Sample]) -> list[SampleShape]:
        return [sample_shape(s, self.spec.patch_size) for s in samples]  # pack_samples' text multiple: 1

    def encode_prompt(self, prompt: str, max_length: int) -> tuple[torch.Tensor, int]:
        """Unpadded (L, D) features of one templated prompt cut to `max_length` tokens, and how many were cut."""
        batch = self.tokenizer.encode([prompt], max_length)
        features = self.backend.encode_text(batch.input_ids, batch.attention_mask)
        return features[0, : int(batch.attention_mask.sum())], batch.truncated[0]
