"""The tensor contract of the four component graphs (docs/tensor_contract.md), computed from the configs alone.

ONNX export records the same contract from the traced graphs (a test holds the two equal); the `pytorch`
repository backend uses this one, so serving a checkpoint in PyTorch never needs an ONNX export of it.
Shapes: ints are fixed, strings name dynamic axes.
"""

from __future__ import annotations

from typing import Any

from serving.model.spec import ModelSpec

Tensor = dict[str, Any]


def _t(name: str, dtype: str, *shape: int | str) -> Tensor:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def graph_contracts(spec: ModelSpec, text_dim: int) -> dict[str, dict[str, list[Tensor]]]:
    """Inputs and outputs per graph; `text_dim` is the MLLM's hidden size."""
    patch = spec.patch_size**2 * spec.latent_channels
    half_head = sum(spec.axes_dim_rope) // 2
    channels = spec.latent_channels
    return {
        "text_encoder": {
            "inputs": [
                _t("input_ids", "int64", "batch", "text_len"),
                _t("attention_mask", "int64", "batch", "text_len"),
            ],
            "outputs": [_t("text_feats", "float32", "batch", "text_len", text_dim)],
        },
        "vae_encoder": {
            "inputs": [_t("image", "float32", "batch", 3, "height", "width")],
            "outputs": [_t("latents", "float32", "batch", channels, "latent_height", "latent_width")],
        },
        "transformer": {
            "inputs": [
                _t("img_tokens", "float32", "batch", "img_len", patch),
                _t("img_mask", "bool", "batch", "img_len"),
                _t("timestep", "float32", "batch"),
                _t("text_feats", "float32", "batch", "text_len", text_dim),
                _t("text_mask", "bool", "batch", "text_len"),
                _t("ref_tokens", "float32", "batch", "ref_slots", "ref_len", patch),
                _t("ref_mask", "bool", "batch", "ref_slots", "ref_len"),
                _t("rope_cos", "float32", "batch", "seq_len", half_head),
                _t("rope_sin", "float32", "batch", "seq_len", half_head),
            ],
            "outputs": [_t("velocity", "float32", "batch", "img_len", patch)],
        },
        "vae_decoder": {
            "inputs": [_t("latents", "float32", "batch", channels, "latent_height", "latent_width")],
            "outputs": [_t("image", "float32", "batch", 3, "height", "width")],
        },
    }


def static_dims(shape: list[int | str]) -> list[int]:
    """A shape with every dynamic (named) axis as -1, as Triton's model configs spell it."""
    return [d if isinstance(d, int) else -1 for d in shape]


def dims_only(contract: dict[str, list[Tensor]]) -> dict[str, list[tuple[str, str, list[int]]]]:
    """A contract's tensors as (name, dtype, static_dims): two contracts that differ only in what they call their
    dynamic axes (a traced export's and this module's) compare equal."""
    return {
        side: [(t["name"], t["dtype"], static_dims(t["shape"])) for t in tensors]
        for side, tensors in contract.items()
        if side in ("inputs", "outputs")
    }
