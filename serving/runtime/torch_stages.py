"""The transformer module's stages in PyTorch: step caching's `Stages` for the eager pipeline and the PyTorch
component. Hidden states stay on the model's device and in its dtype between stages (and in the cache state:
bf16 weights keep bf16 state); inputs and the velocity keep the float32 CPU tensor contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from serving.model.transformer import OmniGen2Transformer, joint_mask
from serving.pipeline.step_cache import PACKED_INPUTS


class TorchStages:
    def __init__(self, model: OmniGen2Transformer) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def _rows(self, inputs: Mapping[str, Any], name: str, rows: list[int]) -> torch.Tensor:
        tensor = torch.as_tensor(inputs[name])
        return (tensor if rows == list(range(len(tensor))) else tensor[rows]).to(self.device)

    def _masks(self, inputs: Mapping[str, Any], rows: list[int]) -> torch.Tensor:
        return joint_mask(*(self._rows(inputs, name, rows) for name in ("text_mask", "ref_mask", "img_mask")))

    def embed(self, inputs: Mapping[str, Any], rows: list[int]) -> tuple[Any, Any]:
        return self.model.embed(*(self._rows(inputs, name, rows) for name in PACKED_INPUTS))

    def modulate(self, hidden: Any, temb: Any) -> Any:
        return self.model.modulate(hidden, temb)

    def layers(self, hidden: Any, temb: Any, inputs: Mapping[str, Any], rows: list[int]) -> Any:
        cos, sin = self._rows(inputs, "rope_cos", rows), self._rows(inputs, "rope_sin", rows)
        return self.model.run_layers(hidden, temb, self._masks(inputs, rows), cos, sin)

    def head(self, hidden_img: Any, inputs: Mapping[str, Any], rows: list[int]) -> Any:
        temb = self.model.time_embedding(self._rows(inputs, "timestep", rows))
        return self.model.head(hidden_img, temb).float().cpu().contiguous()

    def take(self, array: Any, rows: list[int]) -> Any:
        return array[rows]

    def concat(self, arrays: list[Any]) -> Any:
        return torch.cat(arrays, dim=0)

    def copy(self, array: Any) -> Any:
        return array.clone()

    def zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def joint_mask(self, inputs: Mapping[str, Any], row: int) -> Any:
        return self._masks(inputs, [row])[0]

    def image_count(self, inputs: Mapping[str, Any], row: int) -> int:
        return int(torch.as_tensor(inputs["img_mask"][row]).sum())
