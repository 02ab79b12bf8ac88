"""Safetensors weights as checkpoints publish them: one file, or shards listed by a Hugging Face index json.

Loading never builds a float32 copy of a component: the module is created on the meta device (no storage),
then each tensor is read from its file, cast to the requested dtype, moved to the device and assigned, one
shard at a time, so the peak is the loaded weights plus one tensor in the file's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from serving.errors import CheckpointError


def index_name(stem: str) -> str:
    """`diffusion_pytorch_model` -> `diffusion_pytorch_model.safetensors.index.json`, as Hugging Face names it."""
    return f"{stem}.safetensors.index.json"


def weight_files(part: Path, stem: str) -> list[Path]:
    """The safetensors files of one checkpoint part: `<stem>.safetensors`, or the shards its index lists.

    Every listed shard must exist; the error names the index and the missing shard.
    """
    index = part / index_name(stem)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                str(index), f"not a safetensors index (a 'weight_map' object expected): {exc}"
            ) from exc
        files = [part / name for name in dict.fromkeys(weight_map.values())]
        for path in files:
            if not path.is_file():
                raise CheckpointError(str(index), f"lists shard {path.name}, which is missing")
        return files
    single = part / f"{stem}.safetensors"
    if not single.is_file():
        raise CheckpointError(str(single), f"file not found (nor a sharded {index.name})")
    return [single]


def header_shapes(files: list[Path]) -> dict[str, tuple[Path, list[int]]]:
    """Every tensor's file and shape, from the safetensors headers alone (no tensor data is read)."""
    found: dict[str, tuple[Path, list[int]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a mapping)
                    found[key] = (path, list(handle.get_slice(key).get_shape()))
        except SafetensorError as exc:
            raise CheckpointError(str(path), f"not a readable safetensors file: {exc}") from exc
    return found


def check_shapes(module: nn.Module, files: list[Path]) -> None:
    """Strictly: every tensor of `module` (meta-device is fine) present, known and of its shape; the error names
    the file. Cheap enough to run before anything is loaded or served."""
    expected = {key: list(value.shape) for key, value in module.state_dict().items()}
    found = header_shapes(files)
    for key, (path, shape) in found.items():
        if key not in expected:
            raise CheckpointError(str(path), f"unexpected tensor {key} (not in this architecture)")
        if shape != expected[key]:
            raise CheckpointError(str(path), f"{key} has shape {shape}, the config expects {expected[key]}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(str(files[0].parent), f"{len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace one parameter or buffer by `tensor` (no copy into the old storage: it may be on the meta device)."""
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(leaf, tensor, persistent=leaf not in owner._non_persistent_buffers_set)


def load_weights(module: nn.Module, files: list[Path], dtype: torch.dtype, device: torch.device | str) -> None:
    """Fill a (meta-device) module from safetensors files after `check_shapes`, one tensor at a time.

    Floating-point tensors take `dtype`; each is cast and moved as it is read, so no whole-model copy exists.
    """
    check_shapes(module, files)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118
                tensor = handle.get_tensor(key)
                cast = dtype if tensor.is_floating_point() else tensor.dtype
                _assign(module, key, tensor.to(device=device, dtype=cast))
