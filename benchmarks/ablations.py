"""`make ablations`: each performance change of the served stack, measured before/after in one run.

    python -m benchmarks.ablations [--checkpoint small] [--size 256]

The end-to-end harness (harness.py) shows what the whole stack gains over the eager pipeline; this one takes the
mechanisms apart on the transformer itself, in process, with the same packing the BLS uses, so that each number
is one change and nothing else: CFG branches in one call, cross-request batching (float32 ONNX Runtime and bf16
PyTorch), shape grouping against padding, the per-call token cap, bf16 weights against float32 and against bf16
autocast, ONNX Runtime thread settings, and the prompt feature cache. Every row is the best of a few repetitions;
`speedup` = before / after.
Results: benchmarks/results/ablations-<checkpoint>/{results.json, results.md, ablations.png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import onnxruntime as ort
import torch

from benchmarks.harness import ROOT, checkpoint_for
from benchmarks.machine import RunStart, describe
from benchmarks.report import run_line
from benchmarks.timing import best_ms
from serving.artifacts.onnx_export import cached_export
from serving.model.checkpoint import load_graph
from serving.model.config import TransformerConfig
from serving.model.spec import ModelSpec
from serving.pipeline.denoise import Sample, pack_samples, sample_shape
from serving.pipeline.grouping import plan_calls
from serving.pipeline.guidance import Branch
from serving.pipeline.prompts import PromptTokenizer
from serving.runtime.onnx_backend import read_manifest
from serving.runtime.ort_session import session_options
from serving.runtime.torch_backend import run_graph

TEXT_MULTIPLE = 16  # as the BLS pads text
FULL_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what serving/runtime/onnx_backend.py sets
Run = Callable[[list[Sample]], None]


@dataclass
class Row:
    change: str
    before: str
    after: str
    before_ms: float
    after_ms: float

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms


class Workbench:
    """Random transformer samples shaped like the benchmark's requests, and the runtimes to run them."""

    def __init__(self, checkpoint: Path, onnx_dir: Path, size: int) -> None:
        manifest = read_manifest(onnx_dir)
        self.spec = ModelSpec.from_dict(manifest["spec"])
        self.onnx_file = onnx_dir / manifest["graphs"]["transformer"]["file"]
        self.transformer = load_graph("transformer", checkpoint)
        self.transformer_bf16 = load_graph("transformer", checkpoint, torch.bfloat16)
        self.text_dim = TransformerConfig.from_file(checkpoint / "transformer" / "config.json").text_feat_dim
        self.latent = size // self.spec.vae_scale
        self.generator = torch.Generator().manual_seed(0)

    def _tensor(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def step(self, refs: int, text_len: int = 40) -> list[Sample]:
        """One request's CFG step: cond and (with references) ref carry the references, uncond none."""
        side = self.latent
        latent = self._tensor(16, side, side)
        prompt, negative = self._tensor(text_len, self.text_dim), self._tensor(12, self.text_dim)
        references = tuple(self._tensor(16, side, side) for _ in range(refs))
        t = torch.tensor(0.3)
        branches = [(Branch.COND, prompt, references)]
        if refs:
            branches.append((Branch.REF, negative, references))
        branches.append((Branch.UNCOND, negative, ()))
        return [Sample(branch, latent, t, text, r) for branch, text, r in branches]

    def ort_runner(
        self, threads: int = 0, spinning: bool = True, level: ort.GraphOptimizationLevel = FULL_OPTIMIZATION
    ) -> Run:
        options = session_options(threads)  # the served settings, then the ablated ones
        options.graph_optimization_level = level
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        session = ort.InferenceSession(str(self.onnx_file), options, providers=["CPUExecutionProvider"])

        def run(samples: list[Sample]) -> None:
            packed = pack_samples(samples, self.spec, TEXT_MULTIPLE).as_inputs()
            session.run(None, {name: tensor.numpy() for name, tensor in packed.items()})

        return run

    def torch_runner(self, dtype: torch.dtype, autocast: bool = False) -> Run:
        """PyTorch with weights in `dtype`; `autocast`: float32 weights, bf16 matrix work (the earlier bf16 path)."""
        graph = self.transformer_bf16 if dtype == torch.bfloat16 and not autocast else self.transformer

        def run(samples: list[Sample]) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                run_graph(graph, **pack_samples(samples, self.spec, TEXT_MULTIPLE).as_inputs())

        return run


def calls(run: Run, groups: Sequence[list[Sample]]) -> Callable[[], None]:
    """One transformer call per group, in order."""

    def run_all() -> None:
        for group in groups:
            run(group)

    return run_all


def at_once(*work: Callable[[], None]) -> None:
    """Run calls concurrently, as two component models without the CPU lane would (torch releases the GIL)."""
    threads = [threading.Thread(target=fn) for fn in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def in_turn(*work: Callable[[], None]) -> None:
    for fn in work:
        fn()


def grouped(
    samples: list[Sample], spec: ModelSpec, overhead_tokens: float, max_tokens: float = math.inf
) -> list[list[Sample]]:
    shapes = [sample_shape(s, spec.patch_size, TEXT_MULTIPLE) for s in samples]
    return [[samples[i] for i in call] for call in plan_calls(shapes, overhead_tokens, max_tokens)]


def measure(bench: Workbench, checkpoint: Path, repeats: int) -> list[Row]:
    ort_fp32 = bench.ort_runner()
    torch_bf16 = bench.torch_runner(torch.bfloat16)
    torch_fp32 = bench.torch_runner(torch.float32)
    t2i, edit, compose = bench.step(0), bench.step(1), bench.step(3)
    eight_t2i = [s for _ in range(8) for s in bench.step(0)]
    eight_edit = [s for _ in range(8) for s in bench.step(1) if s.refs]  # the 16 samples that carry the image
    rows: list[Row] = []

    def row(change: str, before: str, after: str, slow: Callable[[], None], fast: Callable[[], None]) -> None:
        rows.append(Row(change, before, after, best_ms(slow, repeats), best_ms(fast, repeats)))
        print(json.dumps(asdict(rows[-1]) | {"speedup": round(rows[-1].speedup, 2)}), flush=True)

    row(
        "CFG branches in one call (edit step, fp32 ORT)",
        "3 calls of 1",
        "1 call of 3",
        calls(ort_fp32, [[s] for s in edit]),
        calls(ort_fp32, [edit]),
    )
    row(
        "CFG branches in one call (edit step, bf16 PyTorch)",
        "3 calls of 1",
        "1 call of 3",
        calls(torch_bf16, [[s] for s in edit]),
        calls(torch_bf16, [edit]),
    )
    row(
        "cross-request batching (8 T2I steps, fp32 ORT)",
        "8 calls of 2",
        "1 call of 16",
        calls(ort_fp32, [eight_t2i[i : i + 2] for i in range(0, 16, 2)]),
        calls(ort_fp32, [eight_t2i]),
    )
    row(
        "cross-request batching (8 T2I steps, bf16 PyTorch)",
        "8 calls of 2",
        "1 call of 16",
        calls(torch_bf16, [eight_t2i[i : i + 2] for i in range(0, 16, 2)]),
        calls(torch_bf16, [eight_t2i]),
    )
    eight_compose = [s for _ in range(8) for s in bench.step(3) if s.refs]
    capped = grouped(eight_compose, bench.spec, overhead_tokens=math.inf, max_tokens=8192)
    row(
        "call token cap (8 in-context steps: 16 three-image samples, bf16 PyTorch)",
        "1 call of 16",
        f"{len(capped)} calls within 8192 tokens",
        calls(torch_bf16, [eight_compose]),
        calls(torch_bf16, capped),
    )
    mixed = compose + edit + t2i
    # What the BLS plans for float32 `small`: a 10 ms call cost at about 0.2 ms per token is 50 tokens.
    plan = grouped(mixed, bench.spec, overhead_tokens=50)
    row(
        "shape grouping (3-image + 1-image + T2I steps, fp32 ORT)",
        "1 padded call of 7",
        f"{len(plan)} grouped calls",
        calls(ort_fp32, [mixed]),
        calls(ort_fp32, plan),
    )
    decoder = load_graph("vae_decoder", checkpoint, torch.bfloat16)
    latents = bench._tensor(2, 16, bench.latent, bench.latent)

    def decode() -> None:
        run_graph(decoder, latents=latents)

    def transformer_step() -> None:
        torch_bf16(eight_t2i)

    row(
        "components take turns (bf16 step of 16 + VAE decode of 2)",
        "at once",
        "in turn",
        lambda: at_once(transformer_step, decode),
        lambda: in_turn(transformer_step, decode),
    )
    row(
        "bf16 weights (16 T2I samples, PyTorch)",
        "fp32",
        "bf16",
        calls(torch_fp32, [eight_t2i]),
        calls(torch_bf16, [eight_t2i]),
    )
    row(
        "bf16 weights instead of autocast (edit steps of 8 requests, PyTorch)",
        "fp32 weights + bf16 autocast",
        "bf16 weights",
        calls(bench.torch_runner(torch.bfloat16, autocast=True), [eight_edit]),
        calls(torch_bf16, [eight_edit]),
    )
    row(
        "PyTorch -> ONNX Runtime (T2I step, fp32)",
        "PyTorch eager",
        "ONNX Runtime",
        calls(torch_fp32, [t2i]),
        calls(ort_fp32, [t2i]),
    )
    row(
        "ORT graph optimisations (T2I step)",
        "basic",
        "all (fusions, layouts)",
        calls(bench.ort_runner(level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), [t2i]),
        calls(ort_fp32, [t2i]),
    )
    row(
        "ORT spin-waiting threads (T2I step)",
        "spinning off",
        "spinning on",
        calls(bench.ort_runner(spinning=False), [t2i]),
        calls(ort_fp32, [t2i]),
    )
    row(
        "ORT intra-op threads (T2I step)",
        "1 thread",
        f"{os.cpu_count()} threads",
        calls(bench.ort_runner(threads=1), [t2i]),
        calls(ort_fp32, [t2i]),
    )
    tokenizer = PromptTokenizer.from_dir(checkpoint / "processor")
    text_encoder = load_graph("text_encoder", checkpoint)
    cache: dict[str, torch.Tensor] = {}

    def encode() -> None:
        ids, mask = tokenizer(["A red apple on a wooden table", ""])
        run_graph(text_encoder, input_ids=ids, attention_mask=mask)

    def cached() -> None:
        for prompt in ("A red apple on a wooden table", ""):
            cache.setdefault(prompt, torch.empty(0))

    row("prompt feature cache (prompt + empty negative)", "encode", "cache hit", encode, cached)
    return rows


def write_results(
    rows: list[Row], settings: dict[str, Any], started: RunStart, out: Path, title: str, notes: Sequence[str] = ()
) -> None:
    """results.json, results.md (the rows under `title`, on the hardware that ran them, then `notes`) and a plot."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"settings": settings, **started.record(), "rows": [asdict(r) | {"speedup": r.speedup} for r in rows]}
    (out / "results.json").write_text(json.dumps(data, indent=2))
    lines = [
        f"# {title}",
        "",
        f"{run_line(data)} Torch {data['machine']['torch']}; best of {settings['repeats']} per cell, one run.",
        "",
        "| change | before | after | before ms | after ms | speedup |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.change} | {r.before} | {r.after} | {r.before_ms:.2f} | {r.after_ms:.2f} | {r.speedup:.2f}x |"
        for r in rows
    ]
    lines += [line for note in notes for line in ("", note)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_rows(rows, settings, describe(data["machine"]), out / "ablations.png")


def plot_rows(rows: list[Row], settings: dict[str, Any], machine: str, path: Path) -> None:
    shown = [r for r in rows if r.after_ms >= 0.1][::-1]  # a cache hit's speedup would flatten every other bar
    figure, axis = plt.subplots(figsize=(10, 0.5 * len(shown) + 1.2))
    bars = axis.barh([r.change for r in shown], [r.speedup for r in shown], color="tab:blue")
    axis.bar_label(bars, labels=[f"{r.speedup:.2f}x" for r in shown], padding=3, fontsize=8)
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xlim(0, max(r.speedup for r in shown) * 1.15)
    axis.set_xlabel("speedup (before / after; below 1 = slower)")
    axis.set_title(f"One change at a time: {settings['checkpoint']}, {settings['size']}px\n{machine}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", choices=("small", "tiny"), default="small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    started = RunStart()
    checkpoint = checkpoint_for(args.checkpoint, args.work)
    bench = Workbench(checkpoint, cached_export(checkpoint, args.work / "onnx"), args.size)
    rows = measure(bench, checkpoint, args.repeats)
    settings = {"checkpoint": args.checkpoint, "size": args.size, "repeats": args.repeats}
    title = f"Ablations on `{args.checkpoint}` at {args.size}x{args.size}"
    write_results(rows, settings, started, args.out / f"ablations-{args.checkpoint}", title)


if __name__ == "__main__":
    main()
