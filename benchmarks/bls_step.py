"""The BLS's own share of a denoising step: packing and unpacking beside the transformer call they feed.

    python -m benchmarks.bls_step [--model small] [--requests 8] [--size 256] [--repeats 10]

One step of `requests` edit requests (three CFG branches each, one reference image) on the `small` (or `tiny`)
transformer (random weights): the BLS packs the samples (one thread, as the BLS runs), the transformer runs them
in one call (float32, as the default repository computes, every core), the BLS unpacks the velocities. "tables
every step" clears the RoPE table cache before each pack, which is what packing did before the tables were cached
per layout.
Prints a markdown table and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.timing import best_ms
from export.make_checkpoint import TRANSFORMERS
from serving.model.spec import ModelSpec
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.denoise import Sample, pack_samples
from serving.pipeline.guidance import Branch
from serving.pipeline.packing import PackedBatch, _sample_rope, unpack_output

TEXT_MULTIPLE = 16  # as the BLS pads text


def cpu_description() -> str:
    """Model name and the instruction sets that decide bf16 speed, from /proc/cpuinfo where there is one."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return platform.processor() or platform.machine()
    text = info.read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    bf16 = ", ".join(name for name in ("amx_bf16", "avx512_bf16") if name in flags) or "no AMX or AVX512-BF16"
    return f"{model}, {torch.get_num_threads()} threads, {bf16}"


def edit_step(requests: int, latent: int, text_dim: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for r in range(requests):
        image, reference = (torch.randn(16, latent, latent, generator=generator) for _ in range(2))
        prompt, negative = torch.randn(40 + r, text_dim), torch.randn(12, text_dim)
        t = torch.tensor(0.3)
        samples += [
            Sample(Branch.COND, image, t, prompt, (reference,)),
            Sample(Branch.REF, image, t, negative, (reference,)),
            Sample(Branch.UNCOND, image, t, negative, ()),
        ]
    return samples


def measure(model: str, requests: int, size: int, repeats: int) -> list[tuple[str, float]]:
    config = TRANSFORMERS[model]
    spec = ModelSpec(
        patch_size=config.patch_size, axes_dim_rope=config.axes_dim_rope, vae_scaling_factor=1.0, vae_shift_factor=0.0
    )
    samples = edit_step(requests, size // spec.vae_scale, config.text_feat_dim)
    transformer = OmniGen2Transformer(config).eval()
    with torch.no_grad():
        for parameter in transformer.parameters():  # random weights of a trained scale; denormals would be slow
            parameter.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    packed = pack_samples(samples, spec, TEXT_MULTIPLE)

    def bls(cached: bool) -> Callable[[], object]:
        def run() -> list[torch.Tensor]:
            if not cached:
                _sample_rope.cache_clear()
            batch: PackedBatch = pack_samples(samples, spec, TEXT_MULTIPLE)
            return unpack_output(batch.img_tokens, batch.latent_sizes, spec.patch_size)

        return run

    def call() -> None:
        with torch.no_grad():
            transformer(**packed.as_inputs())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the BLS model runs single-threaded
    before, after = best_ms(bls(cached=False), repeats), best_ms(bls(cached=True), repeats)
    torch.set_num_threads(threads)
    return [("BLS, tables every step", before), ("BLS, tables cached", after), ("transformer", best_ms(call, 3))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "small"), default="small")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    rows = measure(args.model, args.requests, args.size, args.repeats)
    transformer_ms = rows[-1][1]
    print(f"{args.requests} edit requests x 3 branches, {args.size}x{args.size}, `{args.model}`; {cpu_description()}\n")
    print("| part of one step | ms | share of the step |\n| --- | --- | --- |")
    for name, ms in rows:
        share = ms / (ms + transformer_ms) if name.startswith("BLS") else 1.0
        print(f"| {name} | {ms:.2f} | {100 * share:.1f} % |")


if __name__ == "__main__":
    main()
