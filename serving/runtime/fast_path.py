"""The PyTorch transformer's fast path: what `--backend pytorch --precision bf16 --device cuda` turns on.

Each mechanism is a switch of its own, so `make ablations` and the GPU check can measure it alone:
- `trim_padding`: a call drops the text, reference-slot and reference-token columns that are padding in every one
  of its rows, before anything runs. A single-row call then has no padded key at all.
- `attention` (serving/model/transformer.py, ATTENTION_MODES): `sdpa` passes no mask where no key is padded, which
  lets SDPA pick its flash or cuDNN kernels, and the grouped key/value heads as they are; `flex` also hands the
  calls that do have padding (CFG branches with prompts of different lengths) to FlexAttention as a block mask.
- `padded_attention` (PADDED_ATTENTION): how `sdpa` takes the calls that do have padded keys: `folded` puts the key
  mask into one extra head channel of the queries and keys, so those calls too go to SDPA unmasked with the grouped
  heads (flash / cuDNN) and the same scores; `bias` adds it as a bias, repeating the heads (the memory-efficient
  kernel), as `dense` and the exported graphs do.
- `sdpa_kernels`: the SDPA kernels those unmasked calls may use, in order of preference (torch's `sdpa_kernel` with
  `set_priority`), e.g. cuDNN before flash; empty, SDPA's own order (flash first). CUDA's kernels: refused on the CPU.
- `compile`: every attention block is compiled (torch.compile, regional: one block's code serves all of them)
  with dynamic shapes, so a new prompt length or resolution does not compile again; `cuda_graphs` adds CUDA graph
  replay (torch.compile's `reduce-overhead`). The compilation happens at load time, over `warmup` resolutions,
  and Inductor's cache lives in `cache_dir`, so a restart reuses it.
The exported graphs keep the dense attention: the fast path is PyTorch's alone.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch._dynamo import config as dynamo_config

from serving.choices import ATTENTION_MODES, PADDED_ATTENTION
from serving.command_flags import DEFAULT_WARMUP as DEFAULT_WARMUP
from serving.command_flags import add_fast_path_arguments as add_fast_path_arguments
from serving.command_flags import check_sdpa_kernels, parse_resolutions, parse_sdpa_kernels
from serving.command_flags import format_resolutions as format_resolutions
from serving.errors import SettingError
from serving.model.transformer import OmniGen2Transformer

WARMUP_TEXT = 128  # tokens of a typical templated prompt; other lengths reuse the dynamic-shape kernels
# Each mask kind, batch of 1 or more, and block type is a graph of its own: far more than dynamo's default of 8
# per function, past which it would silently run the blocks eagerly.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class FastPath:
    attention: str = "dense"
    trim_padding: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    warmup: tuple[tuple[int, int], ...] = ()
    cache_dir: Path | None = None
    sdpa_kernels: tuple[str, ...] = ()  # empty: SDPA's own choice
    padded_attention: str = "bias"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise SettingError("attention", f"{self.attention!r} is not one of {', '.join(ATTENTION_MODES)}")
        if self.cuda_graphs and not self.compile:
            raise SettingError("cuda_graphs", "CUDA graphs come with compilation: turn --compile on as well")
        check_sdpa_kernels(self.sdpa_kernels)
        if self.sdpa_kernels and self.attention == "dense":
            raise SettingError("sdpa_kernels", "dense attention masks every call: choose --attention sdpa or flex")
        if self.padded_attention not in PADDED_ATTENTION:
            raise SettingError(
                "padded_attention", f"{self.padded_attention!r} is not one of {', '.join(PADDED_ATTENTION)}"
            )
        if self.padded_attention != "bias" and self.attention != "sdpa":
            raise SettingError(
                "padded_attention",
                f"{self.padded_attention} is for --attention sdpa ({self.attention} masks its own way)",
            )

    @classmethod
    def off(cls) -> FastPath:
        """The reference's way: dense masks, padded shapes as packed, no compilation."""
        return cls()

    @classmethod
    def default_for(cls, device: torch.device, dtype: torch.dtype) -> FastPath:
        """For bf16 on a GPU: trimming, `sdpa` attention with padded keys folded (the bias's memory-efficient kernel
        took 2.4x flash's time in the H100 probe), compilation and CUDA graphs (`flex` stays a choice until a GPU
        run has measured it against `sdpa`). Elsewhere the reference's way: compiling for the CPU pays only on long
        runs, the CPU's flash kernel takes the bias itself, and the CPU tests hold the eager path to the golden
        outputs."""
        if device.type == "cuda" and dtype == torch.bfloat16:
            return cls(
                "sdpa",
                trim_padding=True,
                compile=True,
                cuda_graphs=True,
                warmup=DEFAULT_WARMUP,
                padded_attention="folded",
            )
        return cls.off()

    def to_params(self) -> dict[str, str]:
        """As Triton model-config parameters (string values), read back by `from_params`. `padded_attention` only
        where it is not `bias`, so the repositories of the other settings stay as they were built before it."""
        folded = {} if self.padded_attention == "bias" else {"padded_attention": self.padded_attention}
        return {
            "attention": self.attention,
            "trim_padding": str(int(self.trim_padding)),
            "compile": str(int(self.compile)),
            "cuda_graphs": str(int(self.cuda_graphs)),
            "warmup": format_resolutions(self.warmup),
            "compile_cache_dir": str(self.cache_dir or ""),
            "sdpa_kernels": ",".join(self.sdpa_kernels),
        } | folded

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> FastPath:
        """A model's parameters -> its fast path; a model configured without one runs the reference's way."""
        if "attention" not in params:
            return cls.off()
        return cls(
            attention=params["attention"],
            trim_padding=params.get("trim_padding") == "1",
            compile=params.get("compile") == "1",
            cuda_graphs=params.get("cuda_graphs") == "1",
            warmup=parse_resolutions(params.get("warmup", "")),
            cache_dir=Path(params["compile_cache_dir"]) if params.get("compile_cache_dir") else None,
            sdpa_kernels=parse_sdpa_kernels(params.get("sdpa_kernels", "")),
            padded_attention=params.get("padded_attention", "bias"),
        )


def check_device(sdpa_kernels: tuple[str, ...], device: torch.device) -> None:
    """Refuse what this device cannot honour: a kernel order is for SDPA's CUDA kernels (on the CPU, SDPA takes its
    own flash or math kernel whatever the order says)."""
    if sdpa_kernels and device.type != "cuda":
        raise SettingError(
            "--sdpa-kernels", f"orders SDPA's CUDA kernels (cuDNN, flash, efficient); leave it out on the {device}"
        )


# The SDPA kernels that take a folded call (no mask, grouped heads) on CUDA: the memory-efficient kernel takes no
# grouped heads, and the math kernel holds every score in float32.
FOLDED_KERNELS = ("cudnn", "flash")


def takes_folded(sdpa_kernels: tuple[str, ...]) -> bool:
    """Whether a kernel order leaves the folded calls a kernel: SDPA's own choice (empty), or cudnn or flash named."""
    return not sdpa_kernels or any(kernel in FOLDED_KERNELS for kernel in sdpa_kernels)


def check_padded_attention(fast: FastPath, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse `folded` where the padded calls would land on SDPA's math kernel or on none: on CUDA only flash and
    cuDNN take them, in bf16 alone (fp32 would fall to the math kernel, whose scores take B x 21 heads x L^2 x 4
    bytes: 11.6 GB for the CFG pair at 8320 tokens); an `sdpa_kernels` order without them leaves no kernel at all.
    The CPU's flash kernel takes any of them."""
    if fast.padded_attention != "folded" or device.type != "cuda":
        return
    if dtype != torch.bfloat16:
        raise SettingError(
            "--padded-attention",
            f"folded needs --precision bf16 on {device}: flash and cuDNN take no {dtype}, and SDPA's math kernel"
            " would hold every score; choose bias",
        )
    if not takes_folded(fast.sdpa_kernels):
        raise SettingError(
            "--padded-attention",
            f"folded needs cudnn or flash in --sdpa-kernels ({','.join(fast.sdpa_kernels)}): no other kernel takes"
            " its calls; add one or choose bias",
        )


def fast_path_from_args(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, build_dir: Path
) -> FastPath:
    """The device's default fast path with the flags given on top of it."""
    fields = asdict(FastPath.default_for(device, dtype))
    flags = {
        "attention": args.attention,
        "trim_padding": args.trim_padding,
        "compile": args.compile,
        "padded_attention": args.padded_attention,
    }
    fields |= {key: value for key, value in flags.items() if value is not None}
    # Turning compilation off turns its CUDA graphs off too, unless they are asked for (and then refused).
    fields["cuda_graphs"] = (
        fields["compile"] and fields["cuda_graphs"] if args.cuda_graphs is None else args.cuda_graphs
    )
    if args.warmup_resolutions is not None:
        fields["warmup"] = args.warmup_resolutions  # parsed by the flag's type
    elif fields["compile"] and not fields["warmup"]:
        fields["warmup"] = DEFAULT_WARMUP
    if fields["compile"]:
        fields["cache_dir"] = (args.compile_cache_dir or build_dir / "torch-compile").resolve()
    if args.sdpa_kernels is not None:
        fields["sdpa_kernels"] = args.sdpa_kernels  # parsed by the flag's type
    if args.padded_attention is None and (fields["attention"] != "sdpa" or not takes_folded(fields["sdpa_kernels"])):
        fields["padded_attention"] = "bias"  # the default follows: `folded` is for sdpa, by flash or cuDNN
    check_device(fields["sdpa_kernels"], device)  # first: on the CPU, whose default attention is dense, the reason
    fast = FastPath(**fields)
    check_padded_attention(fast, device, dtype)
    return fast


def configure(model: OmniGen2Transformer, fast: FastPath) -> None:
    """Set the attention mode and kernels and wrap every block in torch.compile (compiled on first use: see
    `warm_up`)."""
    weight = next(model.parameters())
    check_device(fast.sdpa_kernels, weight.device)
    check_padded_attention(fast, weight.device, weight.dtype)
    model.set_attention(fast.attention)
    model.set_sdpa_kernels(fast.sdpa_kernels)
    model.set_padded_attention(fast.padded_attention)
    if not fast.compile:
        for block in model.blocks():
            block._compiled_call_impl = None  # a model compiled for an earlier setting runs eagerly again
        return
    if fast.cache_dir is not None:
        fast.cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(fast.cache_dir)  # read when Inductor first writes
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 16 * RECOMPILE_LIMIT)
    for block in model.blocks():
        block.compile(**compile_options(fast))


def compile_options(fast: FastPath) -> dict[str, Any]:
    """torch.compile's arguments for every block: one graph per block, by Inductor (Triton kernels on a GPU) unless
    OMNIGEN2_COMPILE_BACKEND names another, e.g. `aot_eager` to check the capture without generating code (the CPU
    rehearsals: Inductor's CPU code takes minutes to build here and is not what a GPU runs)."""
    backend = os.environ.get("OMNIGEN2_COMPILE_BACKEND", "inductor")
    graphs = fast.cuda_graphs and backend == "inductor"  # a mode is Inductor's: other backends take none
    return {"backend": backend, "dynamic": True, "fullgraph": True, "mode": "reduce-overhead" if graphs else None}


def trim_padding(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Packed inputs without the columns that are padding in every row: text past the longest prompt, reference
    slots no row uses, reference tokens past the longest reference. Valid tokens come first in each row and slot
    (serving/pipeline/packing.py) and keep their RoPE rows, so the result is the same arithmetic on fewer tokens.
    Image tokens stay: the velocity keeps the packed shape."""
    text_mask = torch.as_tensor(inputs["text_mask"]).bool()
    ref_mask = torch.as_tensor(inputs["ref_mask"]).bool()
    text_len, (slots, ref_len) = text_mask.shape[1], ref_mask.shape[1:]
    text_keep = int(text_mask.sum(1).max())
    used = ref_mask.any(dim=2).any(dim=0).nonzero()
    slots_keep = int(used.max()) + 1 if len(used) else 0
    ref_keep = int(ref_mask.sum(2).max()) if slots_keep else 0
    if (text_keep, slots_keep, ref_keep) == (text_len, slots, ref_len):
        return dict(inputs)
    img_start = text_len + slots * ref_len
    img_len = torch.as_tensor(inputs["rope_cos"]).shape[1] - img_start
    ref_positions = text_len + (torch.arange(slots_keep)[:, None] * ref_len + torch.arange(ref_keep)).flatten()
    positions = torch.cat([torch.arange(text_keep), ref_positions, img_start + torch.arange(img_len)])
    out = dict(inputs)
    out["text_feats"] = torch.as_tensor(inputs["text_feats"])[:, :text_keep]
    out["text_mask"] = text_mask[:, :text_keep]
    out["ref_tokens"] = torch.as_tensor(inputs["ref_tokens"])[:, :slots_keep, :ref_keep]
    out["ref_mask"] = ref_mask[:, :slots_keep, :ref_keep]
    for name in ("rope_cos", "rope_sin"):
        out[name] = torch.as_tensor(inputs[name])[:, positions]
    return out


def warmup_inputs(
    model: OmniGen2Transformer,
    width: int,
    height: int,
    batch: int,
    refs: int,
    ragged: bool = True,
    vae_scale: int = 8,
    text: int = WARMUP_TEXT,
) -> dict[str, torch.Tensor]:
    """Packed inputs of the shapes a request at this size makes (values do not matter): `batch` rows, each with
    `refs` full references, whose prompts of `text` tokens differ in length when `ragged`, as CFG branches' do
    (or are one prompt's, as the images of one prompt)."""
    config = model.config
    img_len = (height // vae_scale // config.patch_size) * (width // vae_scale // config.patch_size)
    half = sum(config.axes_dim_rope) // 2
    text_mask = torch.ones(batch, text, dtype=torch.bool)
    for row in range(1, batch if ragged else 1):
        text_mask[row, text - 16 * row :] = False
    total = text + refs * img_len + img_len
    return {
        "img_tokens": torch.randn(batch, img_len, config.patch_dim),
        "img_mask": torch.ones(batch, img_len, dtype=torch.bool),
        "timestep": torch.full((batch,), 0.5),
        "text_feats": torch.randn(batch, text, config.text_feat_dim),
        "text_mask": text_mask,
        "ref_tokens": torch.randn(batch, refs, img_len, config.patch_dim),
        "ref_mask": torch.ones(batch, refs, img_len, dtype=torch.bool),
        "rope_cos": torch.ones(batch, total, half),
        "rope_sin": torch.zeros(batch, total, half),
    }
