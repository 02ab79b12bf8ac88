"""The transformer's stage graphs under ONNX Runtime, on numpy arrays: step caching's `Stages` for the ONNX
Runtime component (which imports no torch) and the eager ONNX pipeline alike."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.pipeline.step_cache import PACKED_INPUTS

TRANSFORMER_STAGES = ("transformer_embed", "transformer_modulate", "transformer_layers", "transformer_head")


def joint_mask(inputs: Mapping[str, np.ndarray], rows: list[int]) -> np.ndarray:
    """(b, L) bool: the valid tokens of [text | ref slots | image] for the packed rows."""
    text, ref, img = (np.asarray(inputs[n])[rows] for n in ("text_mask", "ref_mask", "img_mask"))
    mask: np.ndarray = np.concatenate([text, ref.reshape(len(rows), -1), img], axis=1).astype(bool)
    return mask


class OnnxStages:  # step_cache.Stages[np.ndarray]
    def __init__(self, sessions: Mapping[str, ort.InferenceSession]) -> None:
        self.sessions = dict(sessions)

    @classmethod
    def load(cls, files: Mapping[str, Path], options: ort.SessionOptions, providers: list[str]) -> OnnxStages:
        return cls({name: ort.InferenceSession(str(files[name]), options, providers=providers) for name in files})

    def _run(self, name: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs: list[np.ndarray] = self.sessions[name].run(None, {k: np.ascontiguousarray(v) for k, v in feed.items()})
        return outputs

    def embed(self, inputs: Mapping[str, np.ndarray], rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        hidden, temb = self._run("transformer_embed", {n: inputs[n][rows] for n in PACKED_INPUTS})
        return hidden, temb

    def modulate(self, hidden: np.ndarray, temb: np.ndarray) -> np.ndarray:
        return self._run("transformer_modulate", {"hidden": hidden, "temb": temb})[0]

    def layers(
        self, hidden: np.ndarray, temb: np.ndarray, inputs: Mapping[str, np.ndarray], rows: list[int]
    ) -> np.ndarray:
        feed = {"hidden": hidden, "temb": temb, "joint_mask": joint_mask(inputs, rows)}
        feed |= {name: inputs[name][rows] for name in ("rope_cos", "rope_sin")}
        return self._run("transformer_layers", feed)[0]

    def head(self, hidden_img: np.ndarray, inputs: Mapping[str, np.ndarray], rows: list[int]) -> np.ndarray:
        return self._run("transformer_head", {"hidden_img": hidden_img, "timestep": inputs["timestep"][rows]})[0]

    def take(self, array: np.ndarray, rows: list[int]) -> np.ndarray:
        taken: np.ndarray = array[rows]
        return taken

    def concat(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays, axis=0)

    def copy(self, array: np.ndarray) -> np.ndarray:
        return array.copy()

    def zeros(self, shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
        return np.zeros(shape, dtype=like.dtype)

    def joint_mask(self, inputs: Mapping[str, np.ndarray], row: int) -> np.ndarray:
        mask: np.ndarray = joint_mask(inputs, [row])[0]
        return mask

    def image_count(self, inputs: Mapping[str, np.ndarray], row: int) -> int:
        return int(np.asarray(inputs["img_mask"][row]).sum())
