"""The `omnigen2` Triton model: a decoupled Python BLS that drives generation over the component models.

Wire format (all requests and responses of model `omnigen2`):
  inputs   request  BYTES [1]   JSON object of GenerationRequest fields (serving/pipeline/request.py), no images,
                                plus "preview": 0 (none) or k (a preview every k steps and on the last)
           images   BYTES [-1]  optional: encoded input images (PNG/JPEG/WEBP...), at most 5
  outputs  event    BYTES [1]   JSON: {"type": "progress", "step", "total"} per step, then {"type": "result",
                                "seed", "width", "height", "timings", "truncated_prompt_tokens",
                                "truncated_negative_prompt_tokens", "usage": {"text_tokens", "image_tokens",
                                "output_tokens"} (GenerateUsage in the proto)} in the final response
           preview  UINT8 [n, H, W, 3]  with a progress event when a preview is due, at the output size
           images   UINT8 [n, H, W, 3]  final response: 8-bit RGB images (the front end encodes them)
           latents  FP32 [n, 16, h, w] final response: latents as handed to the VAE decoder
With the safety stage on (a `safety` parameter: serving/safety/settings.py), every finished image, and every
preview, is classified by the `safety_classifier` model; the result event then carries "withheld": [{"index",
"findings": [{"label", "score", "threshold"}]}], a withheld image's pixels and latents are zeros, and once a
preview is withheld its progress events say "preview_withheld": true and carry no preview for the rest of the run.
Errors end the stream with a message "CODE: [field: ]detail" (serving/triton/wire.py), CODE one of
INVALID_ARGUMENT (naming the field), CANCELLED, UNAVAILABLE (a component's process died under the request) or
INTERNAL: stream responses carry no status code of their own.
Each failure is written to Triton's log with Triton's request id, which the front end sets to the id of the call
it writes in its access log (INTERNAL failures with their traceback).

Per request: the prompt and negative prompt are cut to max_sequence_length tokens and encoded once (features of
repeated prompts, the empty negative prompt above all, come from a cache keyed by prompt and length), reference
images are encoded once (together), and each step's CFG branches go to the step batcher, which merges them with
the other requests' into one transformer call, or a few where shapes differ so much that padding them together
would cost more than a call, or where one call would pass `max_call_tokens` (grouping.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from serving.model.spec import ModelSpec
from serving.pipeline.denoise import Denoiser, Sample, pack_samples, plan_sizes, prompts_for, sample_shape
from serving.pipeline.grouping import CallCost, padded_tokens, plan_calls
from serving.pipeline.guidance import Branch
from serving.pipeline.image_tensors import postprocess, preprocess_image
from serving.pipeline.images import decode_image, to_uint8
from serving.pipeline.packing import unpack_output
from serving.pipeline.prompts import PromptTokenizer
from serving.pipeline.request import DEFAULT_LIMITS, CacheKind, GenerationRequest, Limits, request_from_params
from serving.pipeline.step_cache import MODE_OF_KIND, CacheBudget, Control, Mode, encode_controls, state_values
from serving.pipeline.text_cache import PromptFeatures, TextFeatureCache
from serving.pipeline.tiling import decode_tiled
from serving.pipeline.timing import Stopwatch
from serving.pipeline.usage import generation_usage
from serving.safety.letterbox import letterbox
from serving.safety.settings import Finding, SafetySettings
from serving.triton.bls_settings import BlsSettings
from serving.triton.component_watch import drained_on_thread, until_answered
from serving.triton.log import route_to_triton
from serving.triton.memory import IdleTrimmer, use_stub_mmap_threshold
from serving.triton.model_config import model_config, parameters
from serving.triton.model_names import BLS_MODEL, MLLM_MODEL, SAFETY_CLASSIFIER, TRANSFORMER, VAE_DECODER, VAE_ENCODER
from serving.triton.responses import CancelledByCallerError, encoded_images, error_response, event, request_json
from serving.triton.step_batcher import StepBatcher
from serving.triton.stops import Stops
from serving.triton.tasks import gather_or_cancel
from serving.triton.tensors import from_triton, to_triton

TEXT_CACHE_SIZE = 256
log = logging.getLogger(__name__)
T = TypeVar("T")


class ComponentError(RuntimeError):
    pass


def _output(response: Any, model: str, name: str) -> np.ndarray | None:
    if response.has_error():
        raise ComponentError(f"{model}: {response.error().message()}")
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    if tensor is None:
        return None
    result: np.ndarray = from_triton(tensor).numpy()
    return result


async def call_component(model: str, inputs: dict[str, np.ndarray], output: str, decoupled: bool = False) -> np.ndarray:
    """One request to a component model; its output arrives in CPU memory whatever device computed it.

    `decoupled`: the model streams (the `mllm` model, which also encodes prompts): the first response that
    carries `output` is the answer.
    """
    request = pb_utils.InferenceRequest(
        model_name=model,
        inputs=[to_triton(name, value) for name, value in inputs.items()],
        requested_output_names=[output],
        preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
    )
    if not decoupled:
        result = _output(await request.async_exec(), model, output)
    else:

        async def drained() -> list[Any]:
            # A blocking iterator: drained on a thread so that the event loop keeps stepping other requests.
            return await drained_on_thread(await request.async_exec(decoupled=True), f"{model}-responses")

        # Watched: a streaming model's request whose stub dies under it would never end (component_watch.py).
        responses = await until_answered(drained, model)
        found = [_output(response, model, output) for response in responses]
        result = next((r for r in found if r is not None), None)
    if result is None:
        raise ComponentError(f"{model}: no {output} in the response")
    return result


def _stop_if_cancelled(request: Any) -> None:
    """Checked before each stage and step, so work the caller left (or the front end stopped) stops within one."""
    if request.is_cancelled():
        raise CancelledByCallerError


def _reference_pixels(blob: bytes, field: str, generation: GenerationRequest, limits: Limits) -> torch.Tensor:
    image = decode_image(blob, field, limits.max_input_image_pixels, limits.max_input_image_bytes)
    return preprocess_image(image, generation.max_pixels, generation.max_input_image_side_length, field)


def _output_images(decoded: np.ndarray, height: int, width: int) -> np.ndarray:
    return to_uint8(postprocess(torch.from_numpy(decoded), height, width))


def _classifier_inputs(images: np.ndarray, side: int) -> dict[str, np.ndarray]:
    """uint8 NHWC images -> the safety classifier's inputs (docs/tensor_contract.md)."""
    sizes = np.array([images.shape[1:3]] * len(images), dtype=np.int32)
    return {"image": np.stack([letterbox(image, side) for image in images]), "image_size": sizes}


@dataclass(frozen=True)
class _Job:
    """A generation request with its inputs encoded, and the sizes it is generated at and answered in."""

    generation: GenerationRequest
    preview: int  # 0: no previews; k: one every k steps and on the last
    prompts: dict[str, PromptFeatures]  # "prompt" and, with text guidance, "negative"
    texts: dict[str, torch.Tensor]  # their features
    ref_latents: list[torch.Tensor]
    gen_size: tuple[int, int]
    out_size: tuple[int, int]  # (height, width)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        route_to_triton()
        use_stub_mmap_threshold()
        params = parameters(model_config(args))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.spec = ModelSpec.from_dict(json.loads(params["spec"]))
        self.tokenizer = PromptTokenizer.from_dir(version_dir / "processor")
        settings = BlsSettings.from_parameters(params)
        self.text_multiple = settings.text_multiple
        self.batcher = StepBatcher(self._run_transformer, max_samples=settings.max_samples)
        self.call_cost = CallCost(fixed_s=settings.call_overhead_ms / 1000)
        self.max_call_tokens = settings.max_call_tokens or math.inf
        self.text_cache = TextFeatureCache(TEXT_CACHE_SIZE)
        # The front end's limits, handed over by the repository generator (absent in older repositories).
        self.limits = Limits(**json.loads(params["limits"])) if "limits" in params else DEFAULT_LIMITS
        # Input images are decoded and resized, outputs resized, here: off the event loop, a bounded few at once.
        self.workers = ThreadPoolExecutor(settings.image_workers, thread_name_prefix="bls-images")
        # Images wait their turn here, where cancellation is seen.
        self.decode_turns = asyncio.Semaphore(settings.image_workers)
        self.vae_tile = settings.vae_tile
        self.vae_tile_overlap = settings.vae_tile_overlap
        # Step caching: the transformer component keeps each request's state under its key (step_cache.py).
        self.cache_value_bytes = settings.step_cache_value_bytes
        self.cache_budget = CacheBudget(settings.max_step_cache_mib * 2**20)
        self.safety = SafetySettings.from_json(params["safety"]) if "safety" in params else None
        self.trimmer = IdleTrimmer()
        self.stops = Stops(BLS_MODEL)
        torch.set_num_threads(1)  # the BLS only packs and steps; the components do the heavy work

    async def execute(self, requests: list[Any]) -> None:
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    async def _serve(self, request: Any) -> None:
        if self.stops.answer(request):  # the front end asks another request of this stream to stop
            return
        sender = request.get_response_sender()
        with self.stops.running(request) as request:  # its work ends before its final response is sent
            try:
                with self.trimmer:
                    response = await self._generate(request, sender)
            except Exception as exc:  # the caller gets the status and the reason; the model keeps serving
                response = error_response(exc, request)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _parse(self, request: Any) -> tuple[GenerationRequest, int, list[bytes]]:
        params = request_json(request)
        preview = int(params.pop("preview", 0))  # 0: none; k: a preview every k steps and on the last
        blobs = encoded_images(request, self.limits.max_input_images)
        generation = request_from_params(params)
        generation.validate(self.limits)
        return generation, preview, blobs

    async def _off_loop(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(function, *args))

    async def _vae_decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> images in [-1, 1]; outputs larger than one tile are decoded tile by tile (tiling.py)."""

        async def decode(piece: torch.Tensor) -> torch.Tensor:
            image = await call_component(VAE_DECODER, {"latents": piece.contiguous().numpy()}, "image")
            return torch.from_numpy(image)

        tiled = await decode_tiled(latents, decode, self.vae_tile, self.vae_tile_overlap, self.spec.vae_scale)
        return tiled.numpy()

    async def _withheld(self, images: np.ndarray) -> dict[int, list[Finding]]:
        """The images (by index) the safety classifier finds over the operator's thresholds, and why; one call for
        all of them, which the classifier's dynamic batcher merges with other requests' images."""
        if self.safety is None:
            return {}
        inputs = await self._off_loop(_classifier_inputs, images, self.safety.side)
        scores = await call_component(SAFETY_CLASSIFIER, inputs, "class_scores")
        found = {i: self.safety.findings(row) for i, row in enumerate(scores.tolist())}
        return {i: findings for i, findings in found.items() if findings}

    async def _decode(self, request: Any, blob: bytes, field: str, generation: GenerationRequest) -> torch.Tensor:
        """One input image, decoded and resized on the pool; not at all if the caller left while it waited."""
        async with self.decode_turns:
            _stop_if_cancelled(request)
            return await self._off_loop(_reference_pixels, blob, field, generation, self.limits)

    async def _generate(self, request: Any, sender: Any) -> Any:
        watch = Stopwatch()
        job = await self._encode_inputs(request, watch)
        cache, cache_note, cache_bytes = self._plan_cache(job.generation, job.texts, job.ref_latents, job.gen_size)
        latents = await self._denoise(request, sender, job, cache, cache_bytes)
        watch.lap("denoise")
        return await self._result(request, job, latents, cache, cache_note, watch)

    async def _encode_inputs(self, request: Any, watch: Stopwatch) -> _Job:
        """The request parsed, its prompts encoded (or found in the text cache) and its input images encoded."""
        generation, preview, blobs = self._parse(request)
        spec = self.spec
        _stop_if_cancelled(request)
        pixels = await gather_or_cancel(
            *(self._decode(request, blob, f"images[{i}]", generation) for i, blob in enumerate(blobs))
        )
        max_length = generation.sequence_length(spec.text_positions)
        prompts = await self.text_cache.lookup(prompts_for(generation), max_length, self._encode_prompts)
        watch.lap("text_encode")

        _stop_if_cancelled(request)
        # All at once: the encoder's dynamic batcher runs same-sized images as one batch.
        encoded = await gather_or_cancel(
            *(call_component(VAE_ENCODER, {"image": p.numpy()}, "latents") for p in pixels)
        )
        ref_latents = [torch.from_numpy(latents)[0] for latents in encoded]
        watch.lap("vae_encode")
        gen_size, out_size = plan_sizes(generation, ref_latents, spec)
        texts = {key: found.features for key, found in prompts.items()}
        return _Job(generation, preview, prompts, texts, ref_latents, gen_size, out_size)

    async def _denoise(self, request: Any, sender: Any, job: _Job, cache: str, cache_bytes: int) -> torch.Tensor:
        """The steps, each followed by a progress response (with a preview when one is due): the final latents. The
        `cache_bytes` reserved for the request's step-cache state are given back however it ends."""
        try:
            # Random keys: the transformer's state outlives a restarted BLS, and several BLS instances share it.
            denoiser = Denoiser(
                job.generation, job.texts, job.ref_latents, job.gen_size, self.spec, secrets.randbits(62), cache
            )
        except BaseException:
            self.cache_budget.release(cache_bytes)
            raise
        self.batcher.register()
        preview_withheld = False  # once a preview is withheld, no later one of this request is shown
        try:
            while not denoiser.done:
                _stop_if_cancelled(request)
                denoiser.advance(await self.batcher.submit(denoiser.samples()))
                outputs, preview_withheld = await self._progress_outputs(denoiser, job, preview_withheld)
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
        finally:
            self.batcher.unregister()
            if cache_bytes:
                await self._release_cache(denoiser.cache_key, job.texts["prompt"].shape[1])
                self.cache_budget.release(cache_bytes)
        return denoiser.latents

    async def _progress_outputs(self, denoiser: Denoiser, job: _Job, preview_withheld: bool) -> tuple[list[Any], bool]:
        """A step's progress event, and its preview when one is due: (the response's outputs, whether this request's
        previews are withheld from now on)."""
        progress: dict[str, Any] = {"type": "progress", "step": denoiser.step, "total": job.generation.steps}
        if not job.preview or (denoiser.step % job.preview != 0 and not denoiser.done):
            return [event(progress)], preview_withheld
        if not preview_withheld:  # once withheld, no preview is sent: nothing to decode or classify
            decoded = await self._vae_decode(denoiser.x0)
            # At the output size, as the final image will be (not the generation size).
            image = await self._off_loop(_output_images, decoded, *job.out_size)
            if not await self._withheld(image):
                return [event(progress), to_triton("preview", image)], False
        progress["preview_withheld"] = True
        return [event(progress)], True

    async def _result(
        self, request: Any, job: _Job, latents: torch.Tensor, cache: str, cache_note: str, watch: Stopwatch
    ) -> Any:
        """The final response: the decoded images (those the safety classifier withholds zeroed), their latents, and
        the result event."""
        _stop_if_cancelled(request)
        out_h, out_w = job.out_size
        decoded = await self._vae_decode(latents)
        images = await self._off_loop(_output_images, decoded, out_h, out_w)
        watch.lap("vae_decode")
        unscaled = self.spec.unscale(latents)
        withheld = await self._withheld(images)
        for index in withheld:  # nothing of a withheld image leaves the BLS
            images[index] = 0
            unscaled[index] = 0
        if self.safety is not None:
            watch.lap("safety")
        generation, spec, prompts = job.generation, self.spec, job.prompts
        n = generation.num_images_per_prompt
        usage = generation_usage(job.texts.values(), job.ref_latents, job.gen_size, n, spec.vae_scale, spec.patch_size)
        result = {
            "type": "result",
            "seed": generation.seed,
            "width": out_w,
            "height": out_h,
            "timings": watch.timings,
            "truncated_prompt_tokens": prompts["prompt"].truncated,
            "truncated_negative_prompt_tokens": prompts["negative"].truncated if "negative" in prompts else 0,
            "cache": cache,
            "cache_note": cache_note,
            "withheld": [{"index": i, "findings": [asdict(f) for f in found]} for i, found in withheld.items()],
            "usage": asdict(usage),
        }
        return pb_utils.InferenceResponse(
            output_tensors=[
                event(result),
                to_triton("images", images),
                to_triton("latents", unscaled),
            ]
        )

    async def _encode_prompts(self, prompts: list[str], max_length: int) -> list[PromptFeatures]:
        """Unpadded features of each prompt cut to `max_length` tokens, all encoded in one call."""
        batch = self.tokenizer.encode(prompts, max_length)
        inputs = {"input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy()}
        # The `mllm` model encodes prompts with the one Qwen2.5-VL it also answers questions with.
        feats = await call_component(MLLM_MODEL, inputs, "text_feats", decoupled=True)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        return [
            PromptFeatures(torch.from_numpy(feats[i, :n].copy()), cut)
            for i, (n, cut) in enumerate(zip(lengths, batch.truncated, strict=True))
        ]

    async def _run_transformer(self, samples: list[Sample]) -> list[torch.Tensor]:
        """One batched step, split by shape where padding would cost more than another call, and at the token cap."""
        shapes = [sample_shape(s, self.spec.patch_size, self.text_multiple) for s in samples]
        velocities: dict[int, torch.Tensor] = {}
        for call in plan_calls(shapes, self.call_cost.overhead_tokens, self.max_call_tokens):
            started = time.perf_counter()
            out = await self._transformer_call([samples[i] for i in call])
            self.call_cost.observe(padded_tokens([shapes[i] for i in call]), time.perf_counter() - started)
            velocities.update(zip(call, out, strict=True))
        return [velocities[i] for i in range(len(samples))]

    def _plan_cache(
        self,
        generation: GenerationRequest,
        texts: dict[str, torch.Tensor],
        ref_latents: list[torch.Tensor],
        gen_size: tuple[int, int],
    ) -> tuple[str, str, int]:
        """(the step caching this request gets, why not the one it asked for, state bytes reserved for it)."""
        mode = MODE_OF_KIND[CacheKind(generation.cache)]
        if mode == Mode.NONE:
            return CacheKind.NONE.value, "", 0
        if not self.cache_value_bytes:
            return CacheKind.NONE.value, "this server's transformer keeps no step-cache state (TensorRT engines)", 0
        cell = self.spec.vae_scale * self.spec.patch_size
        image = (gen_size[0] // cell) * (gen_size[1] // cell)
        refs = sum(r.shape[1] * r.shape[2] for r in ref_latents) // self.spec.patch_size**2
        text = max(t.shape[0] for t in texts.values())
        has_refs = bool(ref_latents) and generation.image_guidance_scale > 1.0
        branches = 1 + (generation.text_guidance_scale > 1.0) * (1 + has_refs)
        values = state_values(
            mode, branches, generation.num_images_per_prompt, text + refs + image, image, self.spec.hidden_size
        )
        nbytes = values * self.cache_value_bytes
        if not self.cache_budget.reserve(nbytes):
            return CacheKind.NONE.value, self.cache_budget.refusal(nbytes), 0
        return generation.cache, "", nbytes

    async def _release_cache(self, key: int, text_dim: int) -> None:
        """Drops a request's state in the transformer, however the request ended: one RELEASE row, tiny shapes."""
        p = self.spec.patch_size
        latent = torch.zeros(self.spec.latent_channels, p, p)
        row = Sample(
            Branch.COND, latent, torch.tensor(0.0), torch.zeros(1, text_dim), (), Control(key, mode=Mode.RELEASE)
        )
        try:
            await self._transformer_call([row])
        except Exception:  # the transformer's idle eviction is the safety net
            log.warning("releasing the step-cache state of key %d failed", key, exc_info=True)

    async def _transformer_call(self, samples: list[Sample]) -> list[torch.Tensor]:
        packed = pack_samples(samples, self.spec, self.text_multiple)
        inputs = {name: tensor.numpy() for name, tensor in packed.as_inputs().items()}
        inputs["timestep"] = inputs["timestep"][:, None]  # Triton's [batch, 1] for a per-sample scalar
        if self.cache_value_bytes:  # a transformer that keeps step-cache state takes each row's control
            inputs["cache_control"], inputs["cache_threshold"] = encode_controls([s.cache for s in samples])
        velocity = await call_component(TRANSFORMER, inputs, "velocity")
        return unpack_output(torch.from_numpy(velocity), packed.latent_sizes, self.spec.patch_size)
