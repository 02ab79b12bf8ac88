"""The PyTorch fast path taken apart (serving/runtime/fast_path.py): each switch measured alone, on one device.

    python -m benchmarks.fast_path_ablations [--checkpoint small] [--size 256] [--device cpu|cuda] [--random]
        [--rows all|sdpa-kernels|padded-attention]
    make ablations                      # runs this after benchmarks/ablations.py, on CUDA when there is one

`--random` builds the checkpoint size's random transformer straight on the device instead of reading one (on the
GPU machine: `--checkpoint full --size 1024 --random`, the second command `make gpu-check` prints).

Rows, each one change on the bf16 transformer (transformer calls as the BLS packs them: text rounded up to 16
tokens, an empty reference slot for text-to-image): trimmed padding and mask-free attention on a branch called
alone (the reference's way of calling); then on a CFG pair in one call, whose prompts differ in length, the
FlexAttention block mask, compiled blocks and CUDA graphs; last, cuDNN's attention kernel before flash
(`--sdpa-kernels cudnn,flash`) on the branch alone, whose every attention call is unmasked, eager and then compiled
with CUDA graphs, and on the CFG pair compiled with CUDA graphs and the bias (there only the calls without padding
change: the main layers' keys are padded); and the CFG pair's padded calls folded (`--padded-attention folded`: no
SDPA mask, grouped heads) against the bias (heads repeated), eager, compiled with CUDA graphs, and so with cuDNN
first (`--sdpa-kernels cudnn,flash`, which the padded calls can take only folded). The compiled rows need a GPU
(Inductor's CPU code is slow to build and is not what serving compiles for), and the kernel order picks among
CUDA's kernels, so on the CPU these rows are left out and the table says so. The compile time (warm-up) is reported
beside the rows, not in them. The kernel-order rows also record which SDPA kernels (aten ops) each side's first call
ran, under the profiler (its cost is in that call's compile time), so a row that compared flash with flash says so;
`--rows sdpa-kernels` runs those rows alone (a GPU session short of time), `--rows padded-attention` the folded rows
(the eager one also on the CPU, which `--rows all` leaves out there). Results:
benchmarks/results/fast-path-<checkpoint>-<device>[-<rows>]/{results.json, results.md, ablations.png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.ablations import Row, write_results
from benchmarks.harness import ROOT, checkpoint_for
from benchmarks.machine import RunStart
from benchmarks.timing import best_ms
from export.make_checkpoint import random_transformer
from serving.model.checkpoint import load_graph, read_spec
from serving.model.spec import ModelSpec
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.denoise import Sample, pack_samples
from serving.pipeline.guidance import Branch
from serving.pipeline.step_cache import UNCACHED, CacheStore
from serving.runtime.fast_path import FastPath
from serving.runtime.torch_backend import transformer_call
from serving.runtime.torch_stages import TorchStages

TEXT_MULTIPLE = 16  # as the BLS pads text
SDPA_OPS = "aten::_scaled_dot_product_"  # the prefix of SDPA's kernels as aten ops: ..._cudnn_attention, ...
PROMPT_TOKENS, NEGATIVE_TOKENS = 40, 12


def cfg_step(model: OmniGen2Transformer, spec: ModelSpec, size: int) -> list[Sample]:
    """A text-to-image step's two branches: the prompt's and the (shorter) negative prompt's."""
    generator = torch.Generator().manual_seed(0)
    side = size // spec.vae_scale
    latent = torch.randn(spec.latent_channels, side, side, generator=generator)
    t = torch.tensor(0.3)
    width = model.config.text_feat_dim
    return [
        Sample(branch, latent, t, torch.randn(tokens, width, generator=generator), ())
        for branch, tokens in ((Branch.COND, PROMPT_TOKENS), (Branch.UNCOND, NEGATIVE_TOKENS))
    ]


def timed(
    model: OmniGen2Transformer,
    fast: FastPath,
    samples: list[Sample],
    spec: ModelSpec,
    repeats: int,
    watch: bool = False,
) -> tuple[float, float, list[str]]:
    """(seconds of the first call, which compiles when `fast` does; best ms of the calls after it; with `watch`, the
    SDPA kernels the first call ran) for one transformer call of `samples`. The first call is the one watched: with
    CUDA graphs the later ones replay a graph, whose kernels the profiler does not name. The model is configured
    for `fast` here: its attention mode is the last one set."""
    stages = TorchStages(model, fast)
    inputs = pack_samples(samples, spec, TEXT_MULTIPLE).as_inputs()
    store: CacheStore[torch.Tensor] = CacheStore()

    def call() -> None:
        transformer_call(stages, inputs, [UNCACHED] * len(samples), store)  # the velocity comes back to the CPU

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if watch else None
    started = time.perf_counter()
    with profiler or contextlib.nullcontext():
        call()
    first_s = time.perf_counter() - started
    ran = sorted({event.name for event in profiler.events() if event.name.startswith(SDPA_OPS)}) if profiler else []
    return first_s, best_ms(call, repeats), ran


class Measured(NamedTuple):
    rows: list[Row]
    compile_seconds: dict[str, float]  # each compiled variant's first call (compiling it)
    sdpa_ops: dict[str, list[str]]  # "change: before" and "change: after" -> the SDPA kernels the kernel rows ran


def measure(model: OmniGen2Transformer, spec: ModelSpec, size: int, repeats: int, rows_wanted: str) -> Measured:
    """The rows (`rows_wanted`: all, or sdpa-kernels alone), and what they recorded beside them."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    pair = cfg_step(model, spec, size)
    alone = pair[:1]
    done = Measured([], {}, {})

    def row(
        change: str, before: str, after: str, slow: FastPath, fast: FastPath, samples: list[Sample], watch: bool = False
    ) -> None:
        _, slow_ms, slow_ops = timed(model, slow, samples, spec, repeats, watch)
        first_s, fast_ms, fast_ops = timed(model, fast, samples, spec, repeats, watch)
        if fast.compile:
            done.compile_seconds[after] = first_s
        if watch:
            done.sdpa_ops.update({f"{change}: {before}": slow_ops, f"{change}: {after}": fast_ops})
        done.rows.append(Row(change, before, after, slow_ms, fast_ms))
        ran = {"sdpa_ops": [slow_ops, fast_ops]} if watch else {}
        print(json.dumps(asdict(done.rows[-1]) | {"speedup": round(done.rows[-1].speedup, 2)} | ran), flush=True)

    dense, trimmed = FastPath.off(), FastPath("dense", trim_padding=True)
    sdpa = FastPath("sdpa", trim_padding=True)
    warm = ((size, size),)
    graphs = FastPath("sdpa", trim_padding=True, compile=True, cuda_graphs=True, warmup=warm)
    every, padded = rows_wanted == "all", rows_wanted == "padded-attention"
    if every:
        row("trimmed padding (T2I branch alone)", "text to 16, empty ref slot", "trimmed", dense, trimmed, alone)
        mask_free = "mask-free attention (T2I branch alone, trimmed)"
        row(mask_free, "dense bias", "no mask, grouped heads", trimmed, sdpa, alone)
    if every and on_gpu:
        compiled = FastPath("sdpa", trim_padding=True, compile=True, warmup=warm)
        flex = FastPath("flex", trim_padding=True, compile=True, warmup=warm)
        row("compiled blocks (T2I CFG pair)", "eager", "compiled", sdpa, compiled, pair)
        row("block-mask attention (T2I CFG pair, compiled)", "dense bias", "FlexAttention", compiled, flex, pair)
        row("CUDA graphs (T2I CFG pair, compiled)", "launches", "graph replay", compiled, graphs, pair)
    if on_gpu and rows_wanted != "padded-attention":
        # The kernel order alone: SDPA's own picks flash for this call; cuDNN measured faster in the GPU check's probe
        sdpa_cudnn, graphs_cudnn = (replace(fast, sdpa_kernels=("cudnn", "flash")) for fast in (sdpa, graphs))
        change = "cuDNN attention first (T2I "
        row(f"{change}branch alone)", "flash", "cuDNN", sdpa, sdpa_cudnn, alone, watch=True)
        row(f"{change}branch alone, graphs)", "flash", "cuDNN, graphs", graphs, graphs_cudnn, alone, watch=True)
        # With the bias: the pair's main layers are masked (its prompts differ in length), so the order reaches only
        # its unmasked calls (the image refiner's); this row is that step's share of the gain
        row(f"{change}CFG pair, graphs)", "flash", "cuDNN, graphs, pair", graphs, graphs_cudnn, pair, watch=True)
    if (every and on_gpu) or padded:
        # The pair's padded calls (every main layer): a bias with the heads repeated (the memory-efficient kernel on
        # CUDA) against the mask folded into the heads, unmasked (flash / cuDNN); the kernels each side ran recorded
        change, folded = "folded padded keys (T2I CFG pair", replace(sdpa, padded_attention="folded")
        row(f"{change})", "bias, heads repeated", "folded, no mask", sdpa, folded, pair, watch=True)
        if on_gpu:
            graphs_folded = replace(graphs, padded_attention="folded")
            row(f"{change}, graphs)", "bias, graphs", "folded, graphs", graphs, graphs_folded, pair, watch=True)
            # and with cuDNN first, which the bias kept from the padded calls: the pair as it could be served
            cudnn_folded = replace(graphs_folded, sdpa_kernels=("cudnn", "flash"))
            after = "folded, cuDNN, graphs"
            row(f"{change}, graphs, cuDNN)", "bias, graphs", after, graphs, cudnn_folded, pair, watch=True)
    return done


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", choices=("small", "tiny", "full"), default="small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--random", action="store_true", help="build the random transformer on the device")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--rows",
        choices=("all", "sdpa-kernels", "padded-attention"),
        default="all",
        help="sdpa-kernels: the kernel order's rows alone; padded-attention: the folded padding's rows alone",
    )
    args = parser.parse_args(argv)
    if args.rows == "sdpa-kernels" and torch.device(args.device).type != "cuda":
        parser.error("--rows sdpa-kernels measures CUDA's kernels: it needs --device cuda")
    started = RunStart()
    if args.random:
        model, spec = random_transformer(args.checkpoint, torch.bfloat16, args.device)
    else:
        checkpoint = checkpoint_for(args.checkpoint, args.work)
        graph, spec = load_graph("transformer", checkpoint, torch.bfloat16, args.device), read_spec(checkpoint)
        assert isinstance(graph, OmniGen2Transformer)
        model = graph
    with torch.no_grad():
        done = measure(model, spec, args.size, args.repeats, args.rows)
    settings = {
        "checkpoint": args.checkpoint,
        "size": args.size,
        "repeats": args.repeats,
        "device": torch.device(args.device).type,
        "rows": args.rows,
        "compile_seconds": done.compile_seconds,
        "sdpa_ops": done.sdpa_ops,
    }
    notes = []
    if done.compile_seconds:
        spent = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in done.compile_seconds.items())
        notes.append(f"First call, compiling (once per process, at load when serving; not in the rows): {spent}.")
    if done.sdpa_ops:
        ran = "; ".join(f"{side}: {', '.join(ops) or 'none seen'}" for side, ops in done.sdpa_ops.items())
        notes.append(f"SDPA kernels (aten ops) each side's first call ran: {ran}.")
    if settings["device"] == "cpu":
        notes.append(
            "Compiled blocks, FlexAttention, CUDA graphs and the SDPA kernel order are measured on a GPU only (module "
            "docstring)."
        )
    title = f"Fast path, one switch at a time: `{args.checkpoint}` at {args.size}x{args.size}, bf16"
    folder = f"fast-path-{args.checkpoint}-{settings['device']}" + ("" if args.rows == "all" else f"-{args.rows}")
    write_results(done.rows, settings, started, args.out / folder, title, notes)


if __name__ == "__main__":
    main()
