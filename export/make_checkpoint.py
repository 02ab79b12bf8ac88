"""Write a random-weight OmniGen2 checkpoint in the official layout, for a named size.

    python -m export.make_checkpoint --size small --out checkpoints/small

Sizes:
  tiny   the golden test checkpoint's configuration (tests and CI)
  small  CPU benchmarks: big enough that model compute, not Python overhead, dominates at 256x256
  full   the official architecture (about 4B transformer + 3.8B MLLM parameters), bf16 and sharded as published;
         built one layer at a time, so making it needs about the largest component's bf16 bytes of memory

The tokenizer, chat template and image-processor files are copied from an existing `processor/` folder
(by default the golden one), so every size tokenises exactly like the tests expect.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import AutoencoderKL
from huggingface_hub import save_torch_state_dict
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from serving.model.checkpoint import CheckpointModules, copy_processor, spec_from_configs
from serving.model.config import TransformerConfig
from serving.model.spec import ModelSpec
from serving.model.transformer import WEIGHTS_STEM, OmniGen2Transformer

DEFAULT_PROCESSOR = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "tiny-omnigen2" / "processor"

TRANSFORMERS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(
        hidden_size=96,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=32,
        axes_dim_rope=(8, 8, 8),
        axes_lens=(512, 256, 256),
        text_feat_dim=64,
    ),
    "small": TransformerConfig(
        hidden_size=384,
        num_layers=6,
        num_refiner_layers=2,
        num_attention_heads=6,
        num_kv_heads=2,
        multiple_of=64,
        axes_dim_rope=(16, 24, 24),
        axes_lens=(1024, 512, 512),
        text_feat_dim=256,
    ),
    "full": TransformerConfig(),  # the defaults are the official architecture
}

_VAE_BASE: dict[str, Any] = {
    "act_fn": "silu",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAES: dict[str, dict[str, Any]] = {
    "tiny": {**_VAE_BASE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 64},
    "small": {**_VAE_BASE, "block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "sample_size": 256},
    "full": {**_VAE_BASE, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 1024},
}

# Qwen2.5-VL. Special-token ids follow the shipped tokenizer (ids 3..6), whatever the vocabulary size.
_MLLM_BASE: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "eos_token_id": 2,
    "pad_token_id": 0,
    "vision_start_token_id": 3,
    "vision_end_token_id": 4,
    "image_token_id": 5,
    "video_token_id": 6,
    "tie_word_embeddings": True,
}
_TEXT_BASE: dict[str, Any] = {
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "type": "mrope", "rope_theta": 10000.0},
}
_VISION_BASE: dict[str, Any] = {
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "initializer_range": 0.02,
}


def _mllm(text: dict[str, Any], mrope: list[int], vision: dict[str, Any]) -> dict[str, Any]:
    rope = {**_TEXT_BASE["rope_parameters"], "mrope_section": mrope}
    if "rope_theta" in text:
        rope["rope_theta"] = text.pop("rope_theta")
    return {
        **_MLLM_BASE,
        "text_config": {**_TEXT_BASE, **text, "rope_parameters": rope},
        "vision_config": {**_VISION_BASE, **vision},
    }


MLLMS: dict[str, dict[str, Any]] = {
    "tiny": _mllm(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 400,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
        },
        [2, 3, 3],
        {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 56,
            "tokens_per_second": 4,
        },
    ),
    "small": _mllm(
        {
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 400,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
        },
        [8, 12, 12],
        {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 256,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "tokens_per_second": 2,
        },
    ),
    "full": _mllm(  # Qwen2.5-VL-3B-Instruct
        {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
        },
        [16, 24, 24],
        {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "window_size": 112,
            "tokens_per_second": 2,
        },
    ),
}

MODEL_INDEX = {
    "_class_name": "OmniGen2Pipeline",
    "mllm": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "processor": ["transformers", "Qwen2_5_VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "transformer": ["omnigen2", "OmniGen2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "dynamic_time_shift": True, "num_train_timesteps": 1000}


# Shards as published checkpoints cut them; small enough that writing one costs little memory beside the model.
MAX_SHARD_SIZE = "2GB"


@contextlib.contextmanager
def _on_meta(dtype: torch.dtype) -> Iterator[None]:
    """Build modules with no storage, their tensors typed `dtype`: materialising them later costs bf16 bytes only."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(previous)


def materialize(model: nn.Module, init: Callable[[nn.Module], None], device: torch.device | str = "cpu") -> None:
    """Give a meta-device model storage on `device` one leaf module at a time, each initialised by `init` in its
    own dtype.

    Unlike building on the CPU and casting, no float32 copy of the component ever exists.
    """
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is None:
            continue
        module.to_empty(device=device, recurse=False)
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            tensor.data.zero_()  # a parameter that `init` leaves alone is zero, never uninitialised memory
        with torch.no_grad():
            init(module)


def _torch_init(module: nn.Module) -> None:
    """PyTorch's own initialisation of each layer; the few free parameters (image-index embeddings) get N(0, 0.02)."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
    elif isinstance(module, OmniGen2Transformer):
        nn.init.normal_(module.image_index_embedding, std=0.02)


def _build_transformer(
    config: TransformerConfig, dtype: torch.dtype, device: torch.device | str
) -> OmniGen2Transformer:
    with _on_meta(dtype):
        model = OmniGen2Transformer(config)
    materialize(model, _torch_init, device)
    return model.eval()


def _build_vae(config: dict[str, Any], dtype: torch.dtype, device: torch.device | str) -> Any:
    with _on_meta(dtype):
        vae = cast(Any, AutoencoderKL(**copy.deepcopy(config)))
    materialize(vae, _torch_init, device)
    return vae.eval()


def _build_mllm(config: dict[str, Any], dtype: torch.dtype, device: torch.device | str) -> Any:
    with _on_meta(dtype):
        mllm = cast(Any, Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(config))))
    materialize(mllm, mllm._init_weights, device)  # transformers' own initialisation, layer by layer
    mllm.tie_weights()
    return mllm.eval()


def _save_transformer(model: OmniGen2Transformer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(
        model.state_dict(),
        directory,
        filename_pattern=WEIGHTS_STEM + "{suffix}.safetensors",
        max_shard_size=MAX_SHARD_SIZE,
    )
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))


def _save_layout(out: Path, processor: Path) -> None:
    """What is not weights: tokenizer files, scheduler config and model index."""
    copy_processor(processor, out / "processor")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))


def _check_size(size: str) -> None:
    if size not in TRANSFORMERS:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(TRANSFORMERS)}")


def _check(size: str, processor: Path) -> None:
    _check_size(size)
    if not (processor / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{processor / 'tokenizer.json'}: processor files to copy not found")


def make_checkpoint(
    size: str, out: Path, seed: int = 0, dtype: torch.dtype | None = None, processor: Path = DEFAULT_PROCESSOR
) -> Path:
    """Random weights in the official layout; `dtype` defaults to bf16 for `full` (as published), else float32."""
    _check(size, processor)
    dtype = dtype or (torch.bfloat16 if size == "full" else torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # One component at a time: each is freed before the next is built, so the peak is the largest one.
    _save_transformer(_build_transformer(TRANSFORMERS[size], dtype, "cpu"), out / "transformer")
    _build_vae(VAES[size], dtype, "cpu").save_pretrained(out / "vae", max_shard_size=MAX_SHARD_SIZE)
    _build_mllm(MLLMS[size], dtype, "cpu").save_pretrained(out / "mllm", max_shard_size=MAX_SHARD_SIZE)
    _save_layout(out, processor)
    return out


def random_modules(
    size: str,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    processor: Path = DEFAULT_PROCESSOR,
) -> CheckpointModules:
    """The same random model as make_checkpoint, built straight on `device` (a GPU: seconds, no file written)."""
    _check(size, processor)
    torch.manual_seed(seed)
    return CheckpointModules(
        transformer=_build_transformer(TRANSFORMERS[size], dtype, device),
        vae=_build_vae(VAES[size], dtype, device),
        mllm=_build_mllm(MLLMS[size], dtype, device),
        processor_dir=processor,
        spec=spec_from_configs(TRANSFORMERS[size], VAES[size], SCHEDULER),
    )


def random_transformer(
    size: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> tuple[OmniGen2Transformer, ModelSpec]:
    """random_modules' transformer alone, and the spec that goes with it (the in-process transformer benchmarks)."""
    _check_size(size)  # no processor: the device machine running this has none
    torch.manual_seed(seed)
    spec = spec_from_configs(TRANSFORMERS[size], VAES[size], SCHEDULER)
    return _build_transformer(TRANSFORMERS[size], dtype, device), spec


def save_modules(modules: CheckpointModules, out: Path) -> Path:
    """Write modules (random_modules' or loaded ones) as a checkpoint in the official layout, in their dtype."""
    out.mkdir(parents=True, exist_ok=True)
    _save_transformer(modules.transformer, out / "transformer")
    modules.vae.save_pretrained(out / "vae", max_shard_size=MAX_SHARD_SIZE)
    modules.mllm.save_pretrained(out / "mllm", max_shard_size=MAX_SHARD_SIZE)
    _save_layout(out, modules.processor_dir)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(TRANSFORMERS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: bfloat16 for full, else float32",
    )
    parser.add_argument("--processor", type=Path, default=DEFAULT_PROCESSOR, help="processor/ folder to copy")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    path = make_checkpoint(args.size, args.out, args.seed, dtype, args.processor)
    print(f"wrote {args.size} checkpoint to {path}")


if __name__ == "__main__":
    main()
