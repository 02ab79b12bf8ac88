"""The advanced settings of the web UI: their starting values (from the server's ModelInfo) and the SDK options
they become. Gradio-free, so the mapping is tested without a browser."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from omnigen2.messages import CacheName, GenerationOptions, SchedulerName, UnderstandOptions
from omnigen2.v1 import omnigen2_pb2 as pb

SCHEDULERS: dict[int, SchedulerName] = {
    pb.SCHEDULER_UNSPECIFIED: "euler",
    pb.SCHEDULER_EULER: "euler",
    pb.SCHEDULER_DPMSOLVER: "dpmsolver",
}
STEP_CACHES: dict[int, CacheName] = {
    pb.STEP_CACHE_UNSPECIFIED: "none",
    pb.STEP_CACHE_NONE: "none",
    pb.STEP_CACHE_TEACACHE: "teacache",
    pb.STEP_CACHE_TAYLORSEER: "taylorseer",
}
RANDOM_SEED = -1  # the UI's "no seed": the server picks one and returns it
SERVER_DEFAULT = 0  # width, height: unset (1024, or an edited image's own size)


@dataclass
class GenerationSettings:
    """One value per control of the advanced-settings panel, in the order the event handlers receive them."""

    negative_prompt: str = ""
    width: int = SERVER_DEFAULT
    height: int = SERVER_DEFAULT
    steps: int = 50
    text_guidance_scale: float = 5.0
    image_guidance_scale: float = 2.0
    cfg_start: float = 0.0
    cfg_end: float = 1.0
    scheduler: SchedulerName = "euler"
    seed: int = RANDOM_SEED
    num_images_per_prompt: int = 1
    max_sequence_length: int = 1024
    max_pixels: int = 1024 * 1024
    max_input_image_side_length: int = 1024
    cache: CacheName = "none"
    teacache_threshold: float = 0.05
    previews: bool = False
    preview_every: int = 1

    @classmethod
    def from_model_info(cls, info: pb.ModelInfo, **overrides: Any) -> GenerationSettings:
        """The served defaults (what an unset field would take), then the operator's overrides."""
        d = info.defaults
        served = cls(
            negative_prompt=d.negative_prompt,
            steps=d.steps,
            text_guidance_scale=d.text_guidance_scale,
            image_guidance_scale=d.image_guidance_scale,
            cfg_start=d.cfg_range.start,
            cfg_end=d.cfg_range.end,
            scheduler=SCHEDULERS.get(d.scheduler, "euler"),
            num_images_per_prompt=d.num_images_per_prompt,
            max_sequence_length=d.max_sequence_length,
            max_pixels=d.max_pixels,
            max_input_image_side_length=d.max_input_image_side_length,
            cache=STEP_CACHES.get(d.cache, "none"),
            teacache_threshold=d.teacache_threshold or 0.05,
        )
        return cls(**{**asdict(served), **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_values(cls, values: tuple[Any, ...]) -> GenerationSettings:
        """The panel's values as Gradio hands them over (numbers may come as floats)."""
        kinds = {f.name: f.type for f in fields(cls)}
        converted: dict[str, Any] = {
            name: int(value) if kinds[name] == "int" else value for name, value in zip(kinds, values, strict=True)
        }
        return cls(**converted)

    def options(self) -> GenerationOptions:
        """The SDK options; the UI's "server default" values (size 0, seed -1) stay unset."""
        options = GenerationOptions(
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            text_guidance_scale=float(self.text_guidance_scale),
            image_guidance_scale=float(self.image_guidance_scale),
            cfg_range=(float(self.cfg_start), float(self.cfg_end)),
            scheduler=self.scheduler,
            num_images_per_prompt=self.num_images_per_prompt,
            max_sequence_length=self.max_sequence_length,
            max_pixels=self.max_pixels,
            max_input_image_side_length=self.max_input_image_side_length,
            cache=self.cache,
            output_format="png",  # lossless, so the page shows the server's pixels
        )
        if self.cache == "teacache":
            options["teacache_threshold"] = float(self.teacache_threshold)
        if self.width != SERVER_DEFAULT:
            options["width"] = self.width
        if self.height != SERVER_DEFAULT:
            options["height"] = self.height
        if self.seed != RANDOM_SEED:
            options["seed"] = self.seed
        if self.previews:
            options["preview_every"] = self.preview_every
        return options


@dataclass
class ChatSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = RANDOM_SEED

    @classmethod
    def from_model_info(cls, info: pb.ModelInfo) -> ChatSettings:
        d = info.understand_defaults
        return cls(max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)

    @classmethod
    def from_values(cls, values: tuple[Any, ...]) -> ChatSettings:
        max_new_tokens, temperature, top_p, top_k, seed = values
        return cls(int(max_new_tokens), float(temperature), float(top_p), int(top_k), int(seed))

    def options(self) -> UnderstandOptions:
        options = UnderstandOptions(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k
        )
        if self.seed != RANDOM_SEED:
            options["seed"] = self.seed
        return options
