"""Transformer configuration, read from `transformer/config.json` of the official checkpoint layout."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from serving.errors import CheckpointError

log = logging.getLogger(__name__)

# Keys the official config carries that do not change the architecture.
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path"}


@dataclass(frozen=True)
class TransformerConfig:
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    hidden_size: int = 2520
    num_layers: int = 32
    num_refiner_layers: int = 2
    num_attention_heads: int = 21
    num_kv_heads: int = 7
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    axes_dim_rope: tuple[int, int, int] = (40, 40, 40)
    axes_lens: tuple[int, int, int] = (1024, 1664, 1664)
    text_feat_dim: int = 2048
    timestep_scale: float = 1000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Features of one patchified latent token: p * p * channels."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def cond_dim(self) -> int:
        """Width of the timestep embedding that modulates the blocks (capped at 1024 as in the reference)."""
        return min(self.hidden_size, 1024)

    def validate(self, source: str = "transformer config") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(source, "hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_kv_heads:
            raise CheckpointError(source, "num_attention_heads must be divisible by num_kv_heads")
        if sum(self.axes_dim_rope) != self.head_dim:
            raise CheckpointError(
                source, f"sum(axes_dim_rope)={sum(self.axes_dim_rope)} must equal head_dim={self.head_dim}"
            )
        if any(d % 2 for d in self.axes_dim_rope):
            raise CheckpointError(source, "every axes_dim_rope entry must be even")

    @classmethod
    def from_dict(cls, raw: dict[str, object], source: str = "transformer config") -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - _IGNORED_KEYS)
        if unknown:  # newer releases add keys (e.g. training switches); the architecture is what the known ones say
            log.warning("%s: ignoring config keys this loader does not know: %s", source, ", ".join(unknown))
        # JSON values in the checkpoint's own types, not checked here (validate checks how the sizes fit together).
        values: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
        for key in ("axes_dim_rope", "axes_lens"):
            if key in values:
                values[key] = tuple(values[key])
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> TransformerConfig:
        if not path.is_file():
            raise CheckpointError(str(path), "file not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(str(path), f"not valid JSON: {exc}") from exc
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"_class_name": "OmniGen2Transformer2DModel"}
        out.update(asdict(self))
        out["axes_dim_rope"] = list(self.axes_dim_rope)
        out["axes_lens"] = list(self.axes_lens)
        return out
