"""The names the serving flags choose from, importable without torch: `python -m serving.stack` checks its flags
before its heavy imports (serving/command_flags.py)."""

from __future__ import annotations

DEVICES = ("auto", "cuda", "cpu")  # where the PyTorch components run (serving/model/devices.py)
BACKENDS = ("onnxruntime", "pytorch", "tensorrt")  # serving/artifacts/repository.py builds each
PRECISIONS = {"pytorch": ("fp32", "bf16"), "tensorrt": ("fp32", "fp16", "bf16")}
# Named by users, not built yet: refused with this reason instead of quietly building something else.
NOT_IMPLEMENTED = {"fp8": "fp8 needs calibrated quantisation (TensorRT Model Optimizer), which is not implemented yet"}
# How attention skips padded keys (serving/model/transformer.py runs them; serving/runtime/fast_path.py chooses).
ATTENTION_MODES = ("dense", "sdpa", "flex")
# SDPA's CUDA kernels, which the unmasked attention calls (unpadded ones, and padded ones folded) may be limited to, in
# order of preference (`--sdpa-kernels`; serving/model/transformer.py maps them onto torch's SDPBackend). Folded
# calls need cudnn or flash among them (serving/runtime/fast_path.py, FOLDED_KERNELS).
SDPA_KERNELS = ("cudnn", "flash", "efficient", "math")
# How `sdpa` attention takes a call whose keys are padded (`--padded-attention`): `folded` puts the key mask into the
# query-key product as one extra head channel, so SDPA gets no mask (flash / cuDNN, grouped heads); `bias` adds it
# as a (B, 1, 1, L) bias with the heads repeated (the memory-efficient kernel), as `dense` and the exported graphs do.
PADDED_ATTENTION = ("folded", "bias")
