"""The `omnigen2` Triton model: a decoupled Python BLS that drives generation over the component models.

Wire format (all requests and responses of model `omnigen2`):
  inputs   request  BYTES [1]   JSON object of GenerationRequest fields (serving/pipeline/request.py), no images
           images   BYTES [-1]  optional: encoded input images (PNG/JPEG/WEBP...), at most 5
  outputs  event    BYTES [1]   JSON: {"type": "progress", "step", "total"} per step, then {"type": "result",
                                "seed", "width", "height", "timings"} in the final response
           preview  UINT8 [n, h, w, 3]  with a progress event when the request asked for previews
           images   UINT8 [n, H, W, 3]  final response: 8-bit RGB images (the front end encodes them)
           latents  FP32 [n, 16, h, w] final response: latents as handed to the VAE decoder
Errors end the stream with a message "CODE: [field: ]detail" (serving/triton/wire.py), CODE one of
INVALID_ARGUMENT (naming the field), CANCELLED or INTERNAL: stream responses carry no status code of their own.

Per request: the prompt and negative prompt are encoded once (features of repeated prompts, the empty
negative prompt above all, come from a cache), reference images are encoded once (together), and each step's CFG
branches go to the step batcher, which merges them with the other requests' into one transformer call, or a
few where shapes differ so much that padding them together would cost more than a call, or where one call would
pass `max_call_tokens` (grouping.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from serving.pipeline.denoise import Denoiser, Sample, pack_samples, plan_sizes, prompts_for, sample_shape
from serving.pipeline.grouping import CallCost, padded_tokens, plan_calls
from serving.pipeline.images import decode_image, postprocess, preprocess_image, to_uint8
from serving.pipeline.packing import unpack_output
from serving.pipeline.prompts import PromptTokenizer
from serving.pipeline.request import DEFAULT_LIMITS, GenerationRequest, request_from_params
from serving.pipeline.timing import Stopwatch
from serving.runtime.base import ModelSpec
from serving.triton.model_config import model_config, parameters
from serving.triton.responses import CancelledByCallerError, encoded_images, error_response, event, request_json
from serving.triton.step_batcher import StepBatcher

TEXT_CACHE_SIZE = 256


class ComponentError(RuntimeError):
    pass


async def call_component(model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    request = pb_utils.InferenceRequest(
        model_name=model,
        inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
        requested_output_names=[output],
    )
    response = await request.async_exec()
    if response.has_error():
        raise ComponentError(f"{model}: {response.error().message()}")
    result: np.ndarray = pb_utils.get_output_tensor_by_name(response, output).as_numpy()
    return result


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = parameters(model_config(args))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.spec = ModelSpec.from_dict(json.loads(params["spec"]))
        self.tokenizer = PromptTokenizer.from_dir(version_dir / "processor")
        self.text_multiple = int(params.get("text_multiple", "16"))
        self.batcher = StepBatcher(self._run_transformer, max_samples=int(params.get("max_samples", "24")))
        self.call_cost = CallCost(fixed_s=float(params.get("call_overhead_ms", "10")) / 1000)
        self.max_call_tokens = float(params.get("max_call_tokens", "0")) or math.inf
        self.text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.limits = DEFAULT_LIMITS
        torch.set_num_threads(1)  # the BLS only packs and steps; the components do the heavy work

    async def execute(self, requests: list[Any]) -> None:
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    async def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            response = await self._generate(request, sender)
        except Exception as exc:  # the caller gets the status and the reason; the model keeps serving
            response = error_response(exc)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _parse(self, request: Any) -> tuple[GenerationRequest, bool]:
        params = request_json(request)
        preview = bool(params.pop("preview", False))
        images = [
            decode_image(blob, f"images[{i}]", self.limits.max_input_image_pixels, self.limits.max_input_image_bytes)
            for i, blob in enumerate(encoded_images(request, self.limits.max_input_images))
        ]
        generation = request_from_params(params, images)
        generation.validate(self.limits)
        return generation, preview

    async def _generate(self, request: Any, sender: Any) -> Any:
        watch = Stopwatch()
        generation, preview = self._parse(request)
        spec = self.spec
        texts = await self._encode_prompts(prompts_for(generation))
        watch.lap("text_encode")

        pixels = [
            preprocess_image(image, generation.max_pixels, generation.max_input_image_side_length, f"images[{i}]")
            for i, image in enumerate(generation.images)
        ]
        # All at once: the encoder's dynamic batcher runs same-sized images as one batch.
        encoded = await asyncio.gather(
            *(call_component("vae_encoder", {"image": p.numpy()}, "latents") for p in pixels)
        )
        ref_latents = [torch.from_numpy(latents)[0] for latents in encoded]
        watch.lap("vae_encode")

        gen_size, (out_h, out_w) = plan_sizes(generation, ref_latents, spec)
        denoiser = Denoiser(generation, texts, ref_latents, gen_size, spec)
        self.batcher.register()
        try:
            while not denoiser.done:
                if request.is_cancelled():
                    raise CancelledByCallerError
                denoiser.advance(await self.batcher.submit(denoiser.samples()))
                outputs = [event({"type": "progress", "step": denoiser.step, "total": generation.steps})]
                if preview:
                    decoded = await call_component("vae_decoder", {"latents": denoiser.x0.numpy()}, "image")
                    preview_image = to_uint8(postprocess(torch.from_numpy(decoded), *gen_size))
                    outputs.append(pb_utils.Tensor("preview", preview_image))
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
        finally:
            self.batcher.unregister()
        watch.lap("denoise")

        decoded = await call_component("vae_decoder", {"latents": denoiser.latents.numpy()}, "image")
        images = to_uint8(postprocess(torch.from_numpy(decoded), out_h, out_w))
        watch.lap("vae_decode")
        result = {"type": "result", "seed": generation.seed, "width": out_w, "height": out_h, "timings": watch.timings}
        return pb_utils.InferenceResponse(
            output_tensors=[
                event(result),
                pb_utils.Tensor("images", images),
                pb_utils.Tensor("latents", spec.unscale(denoiser.latents).numpy()),
            ]
        )

    async def _encode_prompts(self, prompts: dict[str, str]) -> dict[str, torch.Tensor]:
        """Unpadded features per prompt; uncached prompts are encoded together in one call."""
        missing = sorted({p for p in prompts.values() if p not in self.text_cache})
        if missing:
            ids, mask = self.tokenizer(missing)
            feats = await call_component(
                "text_encoder", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, "text_feats"
            )
            for i, prompt in enumerate(missing):
                self.text_cache[prompt] = torch.from_numpy(feats[i, : int(mask[i].sum())].copy())
                while len(self.text_cache) > TEXT_CACHE_SIZE:
                    self.text_cache.popitem(last=False)
        for prompt in prompts.values():
            self.text_cache.move_to_end(prompt)
        return {key: self.text_cache[prompt] for key, prompt in prompts.items()}

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

    async def _transformer_call(self, samples: list[Sample]) -> list[torch.Tensor]:
        packed = pack_samples(samples, self.spec, self.text_multiple)
        inputs = {name: tensor.numpy() for name, tensor in packed.as_inputs().items()}
        inputs["timestep"] = inputs["timestep"][:, None]  # Triton's [batch, 1] for a per-sample scalar
        velocity = await call_component("transformer", inputs, "velocity")
        return unpack_output(torch.from_numpy(velocity), packed.latent_sizes, self.spec.patch_size)
