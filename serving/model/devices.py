"""Where the PyTorch components run: `--device auto|cuda|cpu`, and whether that device can run the dtype."""

from __future__ import annotations

import torch

from serving.choices import DEVICES
from serving.errors import SettingError

# --precision names -> the dtype the PyTorch components compute in.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when a GPU is visible, else the CPU; asking for CUDA without one is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise SettingError("device", f"unknown device {name!r}; one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("device", f"{name} asked for, but torch sees no CUDA device")
    return torch.device(name)


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before loading gigabytes, a dtype the device cannot compute in."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise SettingError("precision", f"bf16 is not supported by {torch.cuda.get_device_name(device)}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise SettingError("precision", f"{dtype} is not a dtype the components compute in")
