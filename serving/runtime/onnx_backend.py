"""Run the exported component graphs with ONNX Runtime (the CPU serving path and the export parity check)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from serving.errors import CheckpointError
from serving.model.spec import ModelSpec
from serving.pipeline.step_cache import UNCACHED, CacheStore, CallStats, Control, cached_transformer
from serving.runtime.onnx_stages import TRANSFORMER_STAGES, OnnxStages
from serving.runtime.ort_session import session_options

MANIFEST = "manifest.json"
COMPONENT_GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder")
# The whole transformer is exported for TensorRT; ONNX Runtime runs it in stages (step caching needs them).
GRAPH_NAMES = (*COMPONENT_GRAPHS, "transformer", *TRANSFORMER_STAGES)


def read_manifest(export_dir: Path) -> dict[str, Any]:
    path = export_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(str(path), "export manifest not found: run `python -m export.onnx_export` first")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


class OnnxGraph:
    """One ONNX Runtime session fed and read as torch tensors."""

    def __init__(self, path: Path, options: ort.SessionOptions, providers: list[str]) -> None:
        if not path.is_file():
            raise CheckpointError(str(path), "ONNX graph not found")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        feed = {name: np.ascontiguousarray(inputs[name].numpy()) for name in self.input_names}
        return torch.from_numpy(self.session.run(None, feed)[0])


class OnnxBackend:
    def __init__(self, export_dir: Path | str, threads: int = 0, providers: list[str] | None = None) -> None:
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        self.spec = ModelSpec.from_dict(manifest["spec"])
        options = session_options(threads)
        chosen = providers or ["CPUExecutionProvider"]

        def path(name: str) -> Path:
            found: Path = export_dir / manifest["graphs"].get(name, {}).get("file", f"{name}.onnx")
            if not found.is_file():
                raise CheckpointError(
                    str(found), "ONNX graph not found: export again with `python -m export.onnx_export`"
                )
            return found

        self.graphs = {name: OnnxGraph(path(name), options, chosen) for name in COMPONENT_GRAPHS}
        self.stages = OnnxStages.load({name: path(name) for name in TRANSFORMER_STAGES}, options, chosen)
        self.step_cache: CacheStore[np.ndarray] = CacheStore()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.graphs["text_encoder"]({"input_ids": input_ids, "attention_mask": attention_mask})

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.graphs["vae_encoder"]({"image": image})

    def transformer(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.transformer_cached(inputs, [UNCACHED] * len(inputs["img_tokens"]))[0]

    def transformer_cached(
        self, inputs: Mapping[str, torch.Tensor], controls: Sequence[Control]
    ) -> tuple[torch.Tensor, CallStats]:
        feed = {name: value.numpy() for name, value in inputs.items()}
        velocity, stats = cached_transformer(self.stages, feed, controls, self.step_cache)
        return torch.from_numpy(velocity), stats

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graphs["vae_decoder"]({"latents": latents})
