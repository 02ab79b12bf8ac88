"""The flags of the repository generator and of `python -m serving.stack` (the `add_*_arguments`) and their
checks, importable without torch: the stack refuses a bad flag before its heavy imports (6-9 s of torch)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from serving.choices import ATTENTION_MODES, NOT_IMPLEMENTED, PADDED_ATTENTION, PRECISIONS, SDPA_KERNELS
from serving.errors import SettingError
from serving.flag_types import Whole
from serving.safety.settings import SafetySettings
from serving.triton.bls_settings import BlsSettings

# Warmed at load when compiling: the official default, and the usual square sizes below it.
DEFAULT_WARMUP = ((1024, 1024), (768, 768), (512, 512))


def check_precision(backend: str, precision: str) -> None:
    """Refuse a precision the backend does not build, before anything loads (onnxruntime serves float32 whatever
    --precision says)."""
    if backend not in PRECISIONS or precision in PRECISIONS[backend]:
        return
    allowed = " or ".join(PRECISIONS[backend])
    why = f"{NOT_IMPLEMENTED[precision]}; " if precision in NOT_IMPLEMENTED else ""
    raise SettingError("--precision", f"{why}{backend} takes {allowed} ({precision})")


def add_bls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-call-tokens",
        type=Whole(0),
        default=None,
        help="padded tokens per transformer call at most (>= 0), 0 for no cap (default: the backend's; pytorch-bf16 on "
        "the CPU: 8192, pytorch on a GPU: 65536, the others: 17408)",
    )


def add_step_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-step-cache-mib",
        type=Whole(0, why="0: no step caching"),
        default=BlsSettings.max_step_cache_mib,
        help="TeaCache / TaylorSeer state of the requests in flight at most (>= 0; 0: no step caching); past it a "
        "request runs uncached "
        f"(default {BlsSettings.max_step_cache_mib})",
    )


def add_safety_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--safety",
        action="store_true",
        default=os.environ.get("OMNIGEN2_SAFETY", "") not in ("", "0"),
        help="classify every output image and withhold those over the thresholds (needs pip install '.[safety]', "
        "AGPL-3.0; env OMNIGEN2_SAFETY=1)",
    )
    parser.add_argument(
        "--safety-thresholds",
        type=_thresholds,
        default=os.environ.get("OMNIGEN2_SAFETY_THRESHOLDS", ""),
        help="class thresholds to change, JSON (e.g. '{\"BELLY_EXPOSED\": 0.8}'); env OMNIGEN2_SAFETY_THRESHOLDS",
    )


def _thresholds(text: str) -> str:
    """--safety-thresholds, checked as it is read (known classes, scores in [0, 1]), with or without --safety."""
    try:
        SafetySettings.with_overrides(text)
    except SettingError as exc:
        raise argparse.ArgumentTypeError(f"{exc.description} ({text})") from None
    return text


def format_resolutions(resolutions: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{w}x{h}" for w, h in resolutions)


def parse_resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """'1024x1024,768x1344' -> ((1024, 1024), (768, 1344)); '' -> ()."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            width, height = (int(side) for side in item.lower().split("x"))
        except ValueError:
            raise SettingError("warmup_resolutions", f"{item!r} is not WIDTHxHEIGHT") from None
        if width <= 0 or height <= 0:
            raise SettingError("warmup_resolutions", f"{item!r}: sides must be positive")
        out.append((width, height))
    return tuple(out)


def _resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """--warmup-resolutions, parsed as it is read: refused before torch loads, naming the flag."""
    try:
        return parse_resolutions(text)
    except SettingError as exc:
        raise argparse.ArgumentTypeError(exc.description) from None


def check_sdpa_kernels(kernels: tuple[str, ...]) -> tuple[str, ...]:
    """SDPA_KERNELS names, each once (an order of preference); () leaves SDPA its own order."""
    unknown = [name for name in kernels if name not in SDPA_KERNELS]
    if unknown:
        raise SettingError("sdpa_kernels", f"{', '.join(map(repr, unknown))}: not one of {', '.join(SDPA_KERNELS)}")
    twice = sorted({name for name in kernels if kernels.count(name) > 1})
    if twice:
        raise SettingError("sdpa_kernels", f"{', '.join(twice)} named twice")
    return kernels


def parse_sdpa_kernels(text: str) -> tuple[str, ...]:
    """'cudnn,flash' -> ('cudnn', 'flash'); '' -> ()."""
    return check_sdpa_kernels(tuple(filter(None, (part.strip().lower() for part in text.split(",")))))


def _sdpa_kernels(text: str) -> tuple[str, ...]:
    """--sdpa-kernels, parsed as it is read: refused before torch loads, naming the flag."""
    try:
        return parse_sdpa_kernels(text)
    except SettingError as exc:
        raise argparse.ArgumentTypeError(f"{exc.description} ({text})") from None


def _writable_folder(text: str) -> Path:
    """--compile-cache-dir, created and checked as it is read: only Triton's Python stub writes it, after the build
    and the model load, and its failure reads as Triton's "failed to load all models"."""
    folder = Path(text)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create the folder: {exc.strerror} ({text})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in the folder ({text})")
    return folder


def add_fast_path_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PyTorch fast path (defaults: all on for --device cuda with bf16, else off)")
    group.add_argument(
        "--attention", choices=ATTENTION_MODES, default=None, help="how attention skips padding (cuda: sdpa)"
    )
    group.add_argument(
        "--trim-padding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop the columns that are padding in every row of a batched call",
    )
    group.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile each transformer block"
    )
    group.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA graphs for the compiled blocks (needs --compile; default: with --compile)",
    )
    group.add_argument(
        "--warmup-resolutions",
        type=_resolutions,
        default=None,
        help=f"WxH,... compiled and warmed at load (default {format_resolutions(DEFAULT_WARMUP)} when compiling)",
    )
    group.add_argument(
        "--compile-cache-dir", type=_writable_folder, default=None, help="Inductor's cache (default: build dir)"
    )
    group.add_argument(
        "--sdpa-kernels",
        type=_sdpa_kernels,
        default=None,
        help=f"the only SDPA kernels unmasked attention may use, in order of preference, from {','.join(SDPA_KERNELS)}"
        " (e.g. cudnn,flash; math last always runs; CUDA only, with --attention sdpa or flex; default: SDPA's own "
        "order, flash first)",
    )
    group.add_argument(
        "--padded-attention",
        choices=PADDED_ATTENTION,
        default=None,
        help="how --attention sdpa takes calls with padded keys (CFG branches of different prompt lengths): folded "
        "(the mask as an extra head channel, no SDPA mask: flash/cuDNN) or bias (additive mask, heads repeated); "
        "default: folded with --attention sdpa on cuda in bf16 unless --sdpa-kernels names neither cudnn nor flash "
        "(folded is refused there, and in fp32 on cuda), else bias",
    )
