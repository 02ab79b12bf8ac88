"""`make ablations`: each performance change of the served stack, measured before/after in one run.

    python -m benchmarks.ablations [--checkpoint small] [--size 256]
    python -m benchmarks.ablations --prompt-cache-only   # that row alone, in place of its row in the results

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
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import onnxruntime as ort
import torch

from benchmarks.harness import ROOT, checkpoint_for
from benchmarks.machine import RunStart, describe
from benchmarks.report import run_line, save_results
from benchmarks.timing import best_ms
from serving.artifacts.onnx_export import cached_export
from serving.model.checkpoint import load_graph, read_spec
from serving.model.config import TransformerConfig
from serving.model.spec import ModelSpec
from serving.pipeline.denoise import Sample, pack_samples, prompts_for, sample_shape
from serving.pipeline.grouping import plan_calls
from serving.pipeline.guidance import Branch
from serving.pipeline.prompts import PromptTokenizer
from serving.pipeline.request import GenerationRequest
from serving.pipeline.text_cache import PromptFeatures, TextFeatureCache
from serving.runtime.onnx_backend import read_manifest
from serving.runtime.ort_session import session_options
from serving.runtime.torch_backend import run_graph

TEXT_MULTIPLE = 16  # as the BLS pads text
PROMPT_CACHE_ROW = "prompt feature cache (prompt + empty negative)"
# Below this an "after" is a cache hit (microseconds): its ratio to the miss only restates the miss's time, which the
# machine's load moves more than the cache does, so the table gives no speedup for it and the plot leaves it out.
HIT_MS = 0.1
FULL_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what serving/runtime/onnx_backend.py sets
Run = Callable[[list[Sample]], None]
_T = TypeVar("_T")


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
        rows.append(_printed(Row(change, before, after, best_ms(slow, repeats), best_ms(fast, repeats))))

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
    rows.append(_printed(prompt_cache_row(checkpoint, bench.spec, repeats)))
    return rows


def _printed(row: Row) -> Row:
    """`row`, printed as it is measured: a long run shows its progress."""
    print(json.dumps(asdict(row) | {"speedup": round(row.speedup, 2)}), flush=True)
    return row


def _unsuspended(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """The result of a coroutine that ends without suspending, run without an event loop: a loop's own cost per
    run (tens of microseconds) would dwarf a cache hit's, which the BLS awaits inside its running loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    coroutine.close()
    raise RuntimeError("the coroutine suspended: it needs an event loop")


def prompt_cache_row(checkpoint: Path, spec: ModelSpec, repeats: int) -> Row:
    """The served TextFeatureCache.lookup for a request with text guidance (prompt + empty negative): a warm hit
    against a miss, which encodes both prompts in one call as the BLS's _encode_prompts does (here with the text
    encoder in process instead of behind Triton's `mllm` model)."""
    tokenizer = PromptTokenizer.from_dir(checkpoint / "processor")
    text_encoder = load_graph("text_encoder", checkpoint)
    request = GenerationRequest(prompt="A red apple on a wooden table")
    prompts, max_length = prompts_for(request), request.sequence_length(spec.text_positions)

    async def encode(texts: list[str], length: int) -> list[PromptFeatures]:
        batch = tokenizer.encode(texts, length)
        feats = run_graph(text_encoder, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        return [
            PromptFeatures(feats[i, :n].clone(), cut)
            for i, (n, cut) in enumerate(zip(lengths, batch.truncated, strict=True))
        ]

    # A cache that keeps nothing misses every time: what a request pays without one, its lookup included.
    misses, warm = TextFeatureCache(capacity=0), TextFeatureCache(capacity=len(prompts))
    _unsuspended(warm.lookup(prompts, max_length, encode))
    return Row(
        PROMPT_CACHE_ROW,
        "miss: encode",
        "hit",
        best_ms(lambda: _unsuspended(misses.lookup(prompts, max_length, encode)), repeats),
        best_ms(lambda: _unsuspended(warm.lookup(prompts, max_length, encode)), repeats),
    )


def write_results(
    rows: list[Row], settings: dict[str, Any], started: RunStart, out: Path, title: str, notes: Sequence[str] = ()
) -> None:
    """results.json, results.md (the rows under `title`, on the hardware that ran them, then `notes`) and a plot."""
    data = {"settings": settings, **started.record(), "rows": [_record(r) for r in rows]}
    _write(data, out, title, notes)


def rerun_row(row: Row, settings: dict[str, Any], started: RunStart, out: Path, title: str) -> None:
    """`row` in place of its change's row in the results in `out`, the others left as their run measured them:
    results.json lists the later run (its commit, machine and settings) under `reruns`, results.md names it."""
    data = json.loads((out / "results.json").read_text())
    if row.change not in [r["change"] for r in data["rows"]]:
        raise SystemExit(f"{out / 'results.json'} has no row {row.change!r} to replace: run all the rows")
    data["rows"] = [_record(row) if r["change"] == row.change else r for r in data["rows"]]
    later = {"change": row.change, "settings": settings, **started.record()}
    data["reruns"] = [r for r in data.get("reruns", []) if r["change"] != row.change] + [later]
    _write(data, out, title)


def _record(row: Row) -> dict[str, Any]:
    return asdict(row) | {"speedup": row.speedup}


def _run_line(run: dict[str, Any]) -> str:
    return f"{run_line(run)} Torch {run['machine'].get('torch', 'not recorded')}"


def _ms(ms: float) -> str:
    """Three significant digits, so a microsecond hit does not read 0.00, without an exponent past a second."""
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.3g}"


def _speedup_cell(row: Row) -> str:
    return "not given (below)" if row.after_ms < HIT_MS else f"{row.speedup:.2f}x"


def _write(data: dict[str, Any], out: Path, title: str, notes: Sequence[str] = ()) -> None:
    rows = [Row(**{k: v for k, v in r.items() if k != "speedup"}) for r in data["rows"]]
    reruns = data.get("reruns", [])
    runs = "one run" if not reruns else "one run but for the rows of a later run named below"
    lines = [
        f"# {title}",
        "",
        f"{_run_line(data)}; best of {data['settings']['repeats']} per cell, {runs}.",
        "",
        "| change | before | after | before ms | after ms | speedup |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.change} | {r.before} | {r.after} | {_ms(r.before_ms)} | {_ms(r.after_ms)} | {_speedup_cell(r)} |"
        for r in rows
    ]
    hits = [
        f'The row "{r.change}" gives no speedup: its "after" ({_ms(r.after_ms)} ms) is a lookup, so the ratio '
        f'({r.speedup:.0f}x) would only restate its "before" ({_ms(r.before_ms)} ms), which the load of the run that '
        "timed it moves more than the cache does."
        for r in rows
        if r.after_ms < HIT_MS
    ]
    lines += [line for note in hits for line in ("", note)]
    for later in reruns:
        lines += [
            "",
            f'The row "{later["change"]}" is from a later run that measured it alone (best of '
            f"{later['settings']['repeats']}): {_run_line(later)}.",
        ]
    lines += [line for note in notes for line in ("", note)]
    save_results(out, data, "\n".join(lines) + "\n")
    plot_rows(rows, data["settings"], describe(data["machine"]), out / "ablations.png")


def plot_rows(rows: list[Row], settings: dict[str, Any], machine: str, path: Path) -> None:
    shown = [r for r in rows if r.after_ms >= HIT_MS][::-1]  # a cache hit's speedup would flatten every other bar
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
    parser.add_argument(
        "--prompt-cache-only",
        action="store_true",
        help="measure the prompt feature cache row alone, in place of that row of the results already in --out",
    )
    args = parser.parse_args(argv)
    started = RunStart()
    checkpoint = checkpoint_for(args.checkpoint, args.work)
    settings = {"checkpoint": args.checkpoint, "size": args.size, "repeats": args.repeats}
    title = f"Ablations on `{args.checkpoint}` at {args.size}x{args.size}"
    out = args.out / f"ablations-{args.checkpoint}"
    if args.prompt_cache_only:
        spec = read_spec(checkpoint)
        rerun_row(_printed(prompt_cache_row(checkpoint, spec, args.repeats)), settings, started, out, title)
        return
    bench = Workbench(checkpoint, cached_export(checkpoint, args.work / "onnx"), args.size)
    rows = measure(bench, checkpoint, args.repeats)
    write_results(rows, settings, started, out, title)


if __name__ == "__main__":
    main()
