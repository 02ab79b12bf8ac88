"""The `omnigen2` BLS's settings: their defaults live here only. The repository generator writes them into the
model config as parameters; the BLS reads them back with `from_parameters` (absent ones keep the default)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from serving.pipeline.grouping import CALL_OVERHEAD_MS


@dataclass(frozen=True)
class BlsSettings:
    max_samples: int = 24  # transformer samples per step-batched call (requests x CFG branches x images)
    text_multiple: int = 16  # padded text lengths are rounded up to this (shape bucketing)
    call_overhead_ms: float = CALL_OVERHEAD_MS  # a call's fixed cost: shapes share a call below it (grouping.py)
    # Padded tokens per transformer call at most (0: no cap); bigger calls are cut. Attention memory grows with a
    # call's padded tokens times its longest sample (ONNX Runtime float32 on the CPU: about 35 bytes x n x tokens,
    # docs/reliability.md), so at the front end's sample budget no call holds more than one largest sample does.
    max_call_tokens: int = 17_408
    instances: int = 1  # one event loop serves every request concurrently
    image_workers: int = 2  # input images decoded / outputs resized at once, off the event loop
    vae_tile: int = 128  # latent cells per side of a VAE-decoder tile (1024 px); larger outputs decode in tiles
    vae_tile_overlap: int = 16  # latent cells shared by neighbouring tiles, blended (serving/pipeline/tiling.py)
    # Step caching: bytes per cached value in the transformer component (4 float32, 2 bf16), 0 where the component
    # keeps no state (TensorRT engines): cache requests then run uncached, and the response says so.
    step_cache_value_bytes: int = 0
    max_step_cache_mib: int = 2048  # cache state of all requests in flight; past it a request runs uncached

    def to_parameters(self) -> dict[str, str]:
        """As Triton model-config parameters (strings); `instances` is the instance group, not a parameter."""
        return {name: str(value) for name, value in asdict(self).items() if name != "instances"}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> BlsSettings:
        values = {f.name: type(getattr(cls(), f.name))(params[f.name]) for f in fields(cls) if f.name in params}
        return cls(**values)
