"""The transformer module's stages in PyTorch: step caching's `Stages` for the eager pipeline and the PyTorch
component. Hidden states stay on the model's device and in its dtype between stages (and in the cache state:
bf16 weights keep bf16 state); inputs and the velocity keep the float32 CPU tensor contract. The fast path
(serving/runtime/fast_path.py) is applied here: padding trimmed, masks dropped where nothing is padded.

A call's inputs cross to the device once, all before its first kernel (`CallInputs`): a copy from pageable host
memory (the served transformer's inputs lie in Triton's shared memory) waits for the work queued on the stream, so a
copy made between stages stopped the host until the device caught up, after which the device idled while the next
kernels were launched. The RoPE tables, most of a call's bytes, used to cross twice. (A step-cached call whose main
layers run fewer rows than its embedding copies those rows' tables again.)"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import NamedTuple

import torch

from serving.model.transformer import FLEX_BLOCK, OmniGen2Transformer, joint_mask
from serving.pipeline.step_cache import UNCACHED, CacheStore, Control, Mode, cached_transformer
from serving.runtime.fast_path import WARMUP_TEXT, FastPath, configure, trim_padding, warmup_inputs

JOINT = "joint_mask"  # the main layers' key mask, built from the three packed masks
RowsKey = tuple[str, tuple[int, ...]]  # an input's name and the rows of the call taken from it


class CallInputs(dict[str, torch.Tensor]):
    """One call's inputs as packed (host tensors), with the device copies its stages have made of them."""

    def __init__(self, inputs: Mapping[str, torch.Tensor]) -> None:
        super().__init__(inputs)
        self.tensors: dict[RowsKey, torch.Tensor] = {}
        self.masks: dict[RowsKey, torch.Tensor | None] = {}  # None: attention goes without it (`_unpadded`)


class TorchStages:  # step_cache.Stages[torch.Tensor]
    def __init__(self, model: OmniGen2Transformer, fast: FastPath | None = None) -> None:
        self.model = model
        self.fast = fast or FastPath.off()
        self.device = next(model.parameters()).device
        configure(model, self.fast)

    def prepare(self, inputs: Mapping[str, torch.Tensor]) -> CallInputs:
        """Called once per transformer call, before its stages: what they take as the call's inputs."""
        if self.fast.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last call's graph outputs were copied out
        return CallInputs(trim_padding(inputs) if self.fast.trim_padding else inputs)

    def _cpu_rows(self, inputs: Mapping[str, torch.Tensor], name: str, rows: list[int]) -> torch.Tensor:
        tensor = torch.as_tensor(inputs[name])
        return tensor if rows == list(range(len(tensor))) else tensor[rows]

    def _rows(self, inputs: Mapping[str, torch.Tensor], name: str, rows: list[int]) -> torch.Tensor:
        """Input `name` of `rows` on the model's device: copied once per call (inputs `prepare` did not make are
        copied each time)."""
        copies = inputs.tensors if isinstance(inputs, CallInputs) else {}
        key = (name, tuple(rows))
        if key not in copies:
            copies[key] = self._cpu_rows(inputs, name, rows).to(self.device)
        return copies[key]

    def _mask(self, inputs: Mapping[str, torch.Tensor], name: str, rows: list[int]) -> torch.Tensor | None:
        """Key mask `name` of `rows` (JOINT: the main layers', from the three masks) on the device, or None where
        attention may go without it; made once per call, as `_rows`."""
        masks = inputs.masks if isinstance(inputs, CallInputs) else {}
        key = (name, tuple(rows))
        if key not in masks:
            mask = self._joint(inputs, rows) if name == JOINT else self._cpu_rows(inputs, name, rows)
            masks[key] = self._device_mask(mask)
        return masks[key]

    def _unpadded(self, mask: torch.Tensor) -> bool:
        """Whether attention may go without this (CPU) mask: nothing padded, and a mode that allows it."""
        return self.model.attention != "dense" and bool(mask.all())

    def _device_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """A CPU mask on the model's device, or None where attention may go without it (`_unpadded`)."""
        return None if self._unpadded(mask) else mask.to(self.device)

    def _joint(self, inputs: Mapping[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        return joint_mask(*(self._cpu_rows(inputs, name, rows) for name in ("text_mask", "ref_mask", "img_mask")))

    def embed(self, inputs: Mapping[str, torch.Tensor], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        def tensor(name: str) -> torch.Tensor:
            return self._rows(inputs, name, rows)

        def mask(name: str) -> torch.Tensor | None:
            return self._mask(inputs, name, rows)

        # The main layers' mask and tables, and the head's timesteps, cross now too, before any kernel is queued
        self._mask(inputs, JOINT, rows)
        return self.model.embed(
            tensor("img_tokens"),
            mask("img_mask"),
            tensor("timestep"),
            tensor("text_feats"),
            mask("text_mask"),
            tensor("ref_tokens"),
            mask("ref_mask"),
            tensor("rope_cos"),
            tensor("rope_sin"),
        )

    def modulate(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.model.modulate(hidden, temb)

    def layers(
        self, hidden: torch.Tensor, temb: torch.Tensor, inputs: Mapping[str, torch.Tensor], rows: list[int]
    ) -> torch.Tensor:
        cos, sin = self._rows(inputs, "rope_cos", rows), self._rows(inputs, "rope_sin", rows)
        return self.model.run_layers(hidden, temb, self._mask(inputs, JOINT, rows), cos, sin)

    def head(self, hidden_img: torch.Tensor, inputs: Mapping[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        temb = self.model.time_embedding(self._rows(inputs, "timestep", rows))
        return self.model.head(hidden_img, temb).float().cpu().contiguous()

    def take(self, array: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return array[rows]

    def concat(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(arrays, dim=0)

    def copy(self, array: torch.Tensor) -> torch.Tensor:
        return array.clone()

    def zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def joint_mask(self, inputs: Mapping[str, torch.Tensor], row: int) -> torch.Tensor:
        return self._joint(inputs, [row])[0].to(self.device)

    def image_count(self, inputs: Mapping[str, torch.Tensor], row: int) -> int:
        return int(torch.as_tensor(inputs["img_mask"][row]).sum())


class WarmupCall(NamedTuple):
    batch: int  # rows of the packed call
    refs: int  # references per row
    ragged: bool  # prompts of different lengths (CFG branches), so rows after the first have padded text
    rows: tuple[int, ...] | None = None  # the rows run, as step caching runs some rows of a call; None: all


# Calls a request makes at each warmed size. A compiled block's graph is chosen by its kind (plain or modulated),
# whether its call has one row or more (dynamo specializes a dimension of size 1) and whether keys are masked;
# these calls make every such graph, so that no request compiles: one branch alone; CFG branches; an edit's
# three with a reference; images of one prompt (several rows, none padded); and one row of a padded call, as
# step caching runs it when the call's other rows skip or extrapolate (one row, with a mask).
WARMUP_CALLS = (
    WarmupCall(1, 0, ragged=False),
    WarmupCall(2, 0, ragged=True),
    WarmupCall(3, 1, ragged=True),
    WarmupCall(2, 0, ragged=False),
    WarmupCall(2, 1, ragged=True, rows=(1,)),
)


# `flex` block masks are graphs of their own for one FLEX_BLOCK-token block and for several. At the warm-up sizes the
# text (WARMUP_TEXT) is one block and the main layers' sequence several; two passes at a small size add the rest:
# every sequence within one block (a short prompt with a small image), and a prompt of several blocks (a long
# one, which the context refiner masks in CFG pairs). 32x32 px is 4 image tokens at patch size 2, not 1: a
# sequence of one token is a graph of its own too (a 16x16 px request's), which these passes need not build.
FLEX_PASS_SIZE = 32
FLEX_PASSES = ((FLEX_PASS_SIZE, FLEX_PASS_SIZE, FLEX_BLOCK // 2), (FLEX_PASS_SIZE, FLEX_PASS_SIZE, 2 * FLEX_BLOCK))


def warmup_passes(fast: FastPath) -> list[tuple[int, int, int]]:
    """(width, height, prompt tokens) the warm-up runs WARMUP_CALLS at."""
    sizes = [(width, height, WARMUP_TEXT) for width, height in fast.warmup]
    return sizes + list(FLEX_PASSES) if fast.attention == "flex" else sizes


@torch.no_grad()
def warm_up(stages: TorchStages) -> dict[str, float]:
    """Compile (or load from the disk cache) and, with CUDA graphs, record the calls of the warm-up sizes, so the
    first requests do not pay for it. Returns what the load report shows."""
    fast = stages.fast
    if not fast.compile:
        return {}
    started = time.perf_counter()
    store: CacheStore[torch.Tensor] = CacheStore()
    # A CUDA graph is recorded on a shape's second run and replayed from its third.
    repeats = 3 if fast.cuda_graphs and stages.device.type == "cuda" else 1
    calls = 0
    for width, height, text in warmup_passes(fast):
        for call in WARMUP_CALLS:
            inputs = warmup_inputs(stages.model, width, height, call.batch, call.refs, call.ragged, text=text)
            # The rows left out compute nothing (RELEASE), as rows that skip or extrapolate: the real path runs the rest
            controls = [
                UNCACHED if call.rows is None or row in call.rows else Control(key=row, mode=Mode.RELEASE)
                for row in range(call.batch)
            ]
            for _ in range(repeats):
                cached_transformer(stages, stages.prepare(inputs), controls, store)
                calls += 1
    if stages.device.type == "cuda":
        torch.cuda.synchronize(stages.device)
    return {"warmup_seconds": time.perf_counter() - started, "warmup_calls": float(calls)}
