"""One request's denoising loop as a state machine, shared by the eager pipeline and the Triton BLS.

The driver asks `samples()` for the transformer inputs the current step needs (one per active CFG branch and
image), runs them however it likes (one call per branch, or batched with other requests), and hands the
velocities back to `advance()`. Everything that decides the numbers (noise, schedule, CFG, solver) lives here,
so every driver produces the same latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serving.model.spec import ModelSpec
from serving.pipeline.grouping import SampleShape
from serving.pipeline.guidance import Branch, StepGuidance, combine, step_guidance
from serving.pipeline.images import generation_size
from serving.pipeline.packing import PackedBatch, pack_batch
from serving.pipeline.request import CacheKind, GenerationRequest, SchedulerKind
from serving.pipeline.schedulers import dpm_solver_step, euler_step, timesteps
from serving.pipeline.step_cache import MODE_OF_KIND, SLOTS_PER_BRANCH, UNCACHED, Control, Mode


@dataclass(frozen=True)
class Sample:
    """One transformer input: a (C, H, W) latent at time t, unpadded (L, D) text features, references."""

    branch: Branch
    latent: torch.Tensor
    timestep: torch.Tensor  # 0-d float32
    text: torch.Tensor
    refs: tuple[torch.Tensor, ...]
    cache: Control = UNCACHED  # step caching of this row (serving/pipeline/step_cache.py)


def initial_noise(seed: int, count: int, height: int, width: int, spec: ModelSpec) -> torch.Tensor:
    """The reference's CPU noise: the same seed gives the same image as the official pipeline."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (count, spec.latent_channels, height // spec.vae_scale, width // spec.vae_scale)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def pack_samples(samples: Sequence[Sample], spec: ModelSpec, text_multiple: int = 1) -> PackedBatch:
    """Pad samples of any mix of requests and branches into one transformer batch.

    `text_multiple` rounds the padded text length up (shape bucketing: fewer distinct shapes for engines and
    Triton's dynamic batcher). At least one reference slot is kept: the graphs take no zero-size axis.
    """
    lengths = [s.text.shape[0] for s in samples]
    text_len = -(-max(lengths) // text_multiple) * text_multiple
    feats = torch.zeros(len(samples), text_len, samples[0].text.shape[1], dtype=samples[0].text.dtype)
    mask = torch.zeros(len(samples), text_len, dtype=torch.bool)
    for i, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
        feats[i, :n] = sample.text
        mask[i, :n] = True
    return pack_batch(
        [s.latent for s in samples],
        torch.stack([s.timestep for s in samples]),
        feats,
        mask,
        [list(s.refs) or None for s in samples],
        patch_size=spec.patch_size,
        axes_dim=spec.axes_dim_rope,
        min_ref_slots=1,
    )


def sample_shape(sample: Sample, patch_size: int, text_multiple: int = 1) -> SampleShape:
    """The token counts `pack_samples` will see for this sample (text rounded up as it rounds)."""
    text = -(-sample.text.shape[0] // text_multiple) * text_multiple
    tokens = [x.shape[-2] * x.shape[-1] // patch_size**2 for x in (*sample.refs, sample.latent)]
    return SampleShape(text, tuple(tokens[:-1]), tokens[-1])


def prompts_for(request: GenerationRequest) -> dict[str, str]:
    """The prompts a request needs encoded: the negative one only when text guidance is on."""
    prompts = {"prompt": request.prompt}
    if request.text_guidance_scale > 1.0:
        prompts["negative"] = request.negative_prompt
    return prompts


def plan_sizes(
    request: GenerationRequest, ref_latents: Sequence[torch.Tensor], spec: ModelSpec
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((gen_height, gen_width), (out_height, out_width)) in pixels, from the request and its references."""
    ref_sizes = [(r.shape[1] * spec.vae_scale, r.shape[2] * spec.vae_scale) for r in ref_latents]
    return generation_size(request.width, request.height, request.max_pixels, ref_sizes)


class Denoiser:
    """Noise -> final latents for one request; `texts` maps "prompt"/"negative" to unpadded (L, D) features.

    `cache_key` names this request's step-cache state (unique among the requests sharing a transformer);
    `cache` overrides the request's own choice (a server that cannot hold the state runs it uncached).
    """

    def __init__(
        self,
        request: GenerationRequest,
        texts: dict[str, torch.Tensor],
        ref_latents: Sequence[torch.Tensor],
        gen_size: tuple[int, int],
        spec: ModelSpec,
        cache_key: int = 1,
        cache: str | None = None,
    ) -> None:
        self.request = request
        self.cache_key = cache_key
        self.cache_mode = MODE_OF_KIND[CacheKind(cache or request.cache)]
        self.branch_calls = dict.fromkeys(Branch, 0)  # TaylorSeer counts each branch's own calls
        self.refs = tuple(ref_latents)
        self.latents = initial_noise(request.seed, request.num_images_per_prompt, *gen_size, spec)
        self.grid = timesteps(
            request.steps, self.latents.shape[-2], self.latents.shape[-1], dynamic_shift=spec.dynamic_time_shift
        )
        self.step = 0
        self.previous_x0: torch.Tensor | None = None
        self.x0 = self.latents  # the latest clean-image prediction, for previews
        negative = texts.get("negative", texts["prompt"])
        self._inputs = {
            Branch.COND: (texts["prompt"], self.refs),
            Branch.REF: (negative, self.refs),
            Branch.UNCOND: (negative, ()),
        }

    @property
    def done(self) -> bool:
        return self.step >= self.request.steps

    def guidance(self) -> StepGuidance:
        r = self.request
        return step_guidance(
            self.step, r.steps, r.text_guidance_scale, r.image_guidance_scale, r.cfg_range, bool(self.refs)
        )

    def samples(self) -> list[Sample]:
        """This step's transformer inputs, branch-major: all images of branch 1, then of branch 2, ..."""
        t = self.grid[self.step]
        out: list[Sample] = []
        for branch in self.guidance().branches:
            text, refs = self._inputs[branch]
            out.extend(
                Sample(branch, latent, t, text, refs, self._control(branch, image))
                for image, latent in enumerate(self.latents)
            )
        return out

    def _control(self, branch: Branch, image: int) -> Control:
        if self.cache_mode == Mode.NONE:
            return UNCACHED
        return Control(
            key=self.cache_key,
            slot=list(Branch).index(branch) * SLOTS_PER_BRANCH + image,
            mode=self.cache_mode,
            step=self.branch_calls[branch],
            force=self.cache_mode == Mode.TEACACHE and self.step in (0, self.request.steps - 1),
            threshold=self.request.teacache_threshold,
        )

    def advance(self, velocities: Sequence[torch.Tensor]) -> None:
        """Combine the branches' velocities (same order as `samples()`) and take one solver step."""
        guidance = self.guidance()
        n = self.latents.shape[0]
        stacked = torch.stack(list(velocities))
        preds = {branch: stacked[i * n : (i + 1) * n] for i, branch in enumerate(guidance.branches)}
        velocity = combine(guidance, preds)
        for branch in guidance.branches:
            self.branch_calls[branch] += 1
        sigma = 1 - self.grid[self.step]
        if self.request.scheduler == SchedulerKind.DPMSOLVER.value:
            self.latents, self.previous_x0 = dpm_solver_step(
                self.latents, velocity, self.grid, self.step, self.previous_x0
            )
            self.x0 = self.previous_x0
        else:
            self.x0 = self.latents + sigma * velocity
            self.latents = euler_step(self.latents, velocity, self.grid, self.step)
        self.step += 1
