"""Step caching per request and CFG branch, inside one batched transformer call: TeaCache and TaylorSeer.

The official OmniGen2 code keeps one cache state per CFG branch and runs each branch as its own transformer
call. Here a call carries many branches of many requests, so each sample row brings a control row
(`Control`: whose state, which mode, which call of its branch) and the state lives in a `CacheStore` beside the
transformer, keyed by (request key, slot). The transformer is run in stages (`Stages`: embed + refiners,
main layers, output head) so that the main layers see only the rows that must compute:

- TeaCache: per branch and step, the relative L1 change of the first main layer's modulated input (over all of
  the branch's images, rescaled by the official polynomial) is accumulated; while the sum stays under the
  threshold the branch skips the main layers and adds its previous main-layer residual instead. The first and
  last steps always compute (`force`).
- TaylorSeer (official settings: 5 full first calls, then a full call every 3rd, Taylor order 4): full calls
  update finite-difference derivatives of the main layers' output; the others extrapolate it. The reference
  keeps derivatives for every layer, but on an extrapolated call each layer's input is ignored, so only the last
  layer's (the output of the main layers) reaches the result: that is all that is kept here, and only at the
  image tokens that the head reads. Extrapolated rows skip the refiners too, whose output the reference discards.

Arrays are numpy (the ONNX Runtime component, which imports no torch) or torch (eager and PyTorch components):
only operations both share are used here, and `Stages` does the rest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np

from serving.pipeline.request import CacheKind

if TYPE_CHECKING:  # the ONNX Runtime component imports no torch: the name is for the checker only
    import torch

# The backend's arrays: the code below is checked once for each.
ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

# The official TeaCache rescaling of the relative L1 change (np.poly1d coefficients, highest power first).
TEACACHE_RESCALE = (-5.48259225, 11.48772289, -4.47407401, 2.47730926, -0.03316487)
# The official TaylorSeer settings (`first_enhance`, `fresh_threshold`, `max_order`).
TAYLOR_FIRST_FULL = 5
TAYLOR_INTERVAL = 3
TAYLOR_ORDER = 4

# The packed inputs of a transformer call (serving/pipeline/packing.py), in the graphs' order.
PACKED_INPUTS = (
    "img_tokens",
    "img_mask",
    "timestep",
    "text_feats",
    "text_mask",
    "ref_tokens",
    "ref_mask",
    "rope_cos",
    "rope_sin",
)
# The transformer component's extra inputs, per sample: INT64 [5] and FP64 [1] (`encode_controls`).
CACHE_INPUTS = ("cache_control", "cache_threshold")
SLOTS_PER_BRANCH = 16  # slot = branch index * SLOTS_PER_BRANCH + image index (at most 8 images per prompt)
CONTROL_WIDTH = 5  # control row: key, slot, mode, step, force
DEFAULT_IDLE_EVICT_S = 600.0  # state untouched this long belongs to a driver that vanished


class Mode(IntEnum):
    NONE = 0
    TEACACHE = 1
    TAYLORSEER = 2
    RELEASE = 3  # drop every entry of the row's key; the row computes nothing


MODE_OF_KIND = {CacheKind.NONE: Mode.NONE, CacheKind.TEACACHE: Mode.TEACACHE, CacheKind.TAYLORSEER: Mode.TAYLORSEER}


@dataclass(frozen=True)
class Control:
    """One sample row's caching: `step` counts the calls of its branch so far; `force` computes regardless."""

    key: int = 0
    slot: int = 0
    mode: Mode = Mode.NONE
    step: int = 0
    force: bool = False
    threshold: float = 0.0

    @property
    def group(self) -> tuple[int, int]:
        """A request's branch: TeaCache decides for all its images at once, as the reference's batched call."""
        return self.key, self.slot // SLOTS_PER_BRANCH


UNCACHED = Control()


def encode_controls(controls: Sequence[Control]) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> (INT64 [B, 5] control, FP64 [B, 1] threshold), the transformer component's extra inputs."""
    rows = [(c.key, c.slot, int(c.mode), c.step, int(c.force)) for c in controls]
    control = np.array(rows, dtype=np.int64).reshape(len(controls), CONTROL_WIDTH)
    threshold = np.array([[c.threshold] for c in controls], dtype=np.float64).reshape(len(controls), 1)
    return control, threshold


def controls_of(feed: dict[str, np.ndarray]) -> list[Control]:
    """Takes a served call's controls out of its feed; a caller that sent none gets every row uncached."""
    if CACHE_INPUTS[0] not in feed:
        return [UNCACHED] * len(feed["img_tokens"])
    return decode_controls(*(np.asarray(feed.pop(name)) for name in CACHE_INPUTS))


def decode_controls(control: np.ndarray, threshold: np.ndarray) -> list[Control]:
    return [
        Control(int(k), int(s), Mode(int(m)), int(st), bool(f), float(t))
        for (k, s, m, st, f), t in zip(control.tolist(), threshold.reshape(-1).tolist(), strict=True)
    ]


def teacache_rescale(rel_l1: float) -> float:
    """The polynomial in float64, Horner's rule as numpy evaluates it."""
    value = 0.0
    for coefficient in TEACACHE_RESCALE:
        value = value * rel_l1 + coefficient
    return value


def taylor_full_call(step: int) -> bool:
    """Whether a TaylorSeer branch computes on its `step`-th call (0-based), else it extrapolates."""
    return step < TAYLOR_FIRST_FULL or (step - TAYLOR_FIRST_FULL) % TAYLOR_INTERVAL == TAYLOR_INTERVAL - 1


@dataclass
class _TeaEntry(Generic[ArrayT]):
    modulated: ArrayT | None = None  # (valid tokens, D): the last computed step's modulated input of this image
    residual: ArrayT | None = None  # (image tokens, D): main layers' output minus input at the image tokens


@dataclass
class _TaylorEntry(Generic[ArrayT]):
    factors: list[ArrayT] = field(default_factory=list)  # derivatives of the main layers' output, order 0..k
    last_full: int = 0  # the branch call at which they were last computed


@dataclass
class _TeaGroup:
    """A request branch's TeaCache decision: the accumulated change, and what was decided at which call (a branch
    that a token cap split over several calls decides once per step, in its first call)."""

    accumulated: float = 0.0
    step: int = -1
    skip: bool = False


@dataclass
class _Entry(Generic[ArrayT]):
    tea: _TeaEntry[ArrayT] = field(default_factory=_TeaEntry)
    taylor: _TaylorEntry[ArrayT] = field(default_factory=_TaylorEntry)
    touched: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.tea.modulated, self.tea.residual) if t is not None]
        return sum(int(t.nbytes) for t in tensors + self.taylor.factors)


class CacheStore(Generic[ArrayT]):
    """Cache state by (request key, slot), with the TeaCache decisions by (request key, branch)."""

    def __init__(self, idle_evict_s: float = DEFAULT_IDLE_EVICT_S) -> None:
        self.entries: dict[tuple[int, int], _Entry[ArrayT]] = {}
        self.groups: dict[tuple[int, int], _TeaGroup] = {}
        self.idle_evict_s = idle_evict_s

    def entry(self, control: Control) -> _Entry[ArrayT]:
        found = self.entries.setdefault((control.key, control.slot), _Entry())
        found.touched = time.monotonic()
        return found

    def release(self, key: int) -> None:
        for store in (self.entries, self.groups):
            for k in [k for k in store if k[0] == key]:
                del store[k]

    def evict_idle(self) -> None:
        """A safety net: drivers release their keys, but one that died cannot."""
        cutoff = time.monotonic() - self.idle_evict_s
        for key in {k[0] for k, e in self.entries.items() if e.touched < cutoff}:
            self.release(key)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


class Stages(Protocol[ArrayT]):
    """The transformer in stages, on the backend's arrays (docs/tensor_contract.md, the `transformer_*` graphs)."""

    def embed(self, inputs: Mapping[str, ArrayT], rows: list[int]) -> tuple[ArrayT, ArrayT]:
        """Rows of the packed inputs -> (hidden (b, L, D), temb (b, C))."""
        ...

    def modulate(self, hidden: ArrayT, temb: ArrayT) -> ArrayT: ...

    def layers(self, hidden: ArrayT, temb: ArrayT, inputs: Mapping[str, ArrayT], rows: list[int]) -> ArrayT:
        """The main layers on `hidden`, whose rows are `rows` of the packed inputs (masks, RoPE)."""
        ...

    def head(self, hidden_img: ArrayT, inputs: Mapping[str, ArrayT], rows: list[int]) -> ArrayT:
        """(b, Li, D) image tokens -> (b, Li, P) velocity, conditioned on the rows' timesteps."""
        ...

    def take(self, array: ArrayT, rows: list[int]) -> ArrayT: ...

    def concat(self, arrays: list[ArrayT]) -> ArrayT:
        """Along the first axis."""
        ...

    def copy(self, array: ArrayT) -> ArrayT: ...

    def zeros(self, shape: tuple[int, ...], like: ArrayT) -> ArrayT: ...

    def joint_mask(self, inputs: Mapping[str, ArrayT], row: int) -> ArrayT:
        """(L,) bool: the valid tokens of one packed row."""
        ...

    def image_count(self, inputs: Mapping[str, ArrayT], row: int) -> int: ...


@dataclass
class CallStats:
    rows: int = 0
    main_layer_rows: int = 0  # rows that ran the main layers: the reference's main_layer_passes, for batch 1


def _taylor_update(entry: _TaylorEntry[ArrayT], feature: ArrayT, step: int) -> None:
    """Finite differences over the distance between full calls, as the reference's derivative approximation
    (orders above 0 only from the call before the 5th on, and one order more per full call, up to 4)."""
    factors = [feature]
    if step > TAYLOR_FIRST_FULL - 2:
        distance = step - entry.last_full
        for order in range(TAYLOR_ORDER):
            if order >= len(entry.factors):
                break
            factors.append((factors[order] - entry.factors[order]) / distance)
    entry.factors, entry.last_full = factors, step


def _taylor_extrapolate(entry: _TaylorEntry[ArrayT], step: int) -> ArrayT:
    x = step - entry.last_full
    terms: list[ArrayT] = [(1 / math.factorial(order)) * f * (x**order) for order, f in enumerate(entry.factors)]
    output = terms[0]  # factors hold order 0 at least (the caller checks)
    for term in terms[1:]:
        output = output + term
    return output


def cached_transformer(
    stages: Stages[ArrayT], inputs: Mapping[str, ArrayT], controls: Sequence[Control], store: CacheStore[ArrayT]
) -> tuple[ArrayT, CallStats]:
    """Velocity (B, Li, P) for the packed batch, each row computed, skipped or extrapolated as its control says."""
    store.evict_idle()
    for c in controls:
        if c.mode == Mode.RELEASE:
            store.release(c.key)
    batch = len(controls)
    img_len = inputs["img_tokens"].shape[1]
    extrapolate = [
        i
        for i, c in enumerate(controls)
        if c.mode == Mode.TAYLORSEER
        and not c.force
        and not taylor_full_call(c.step)
        and store.entry(c).taylor.factors  # state lost (never expected): compute instead
    ]
    active = [i for i, c in enumerate(controls) if c.mode != Mode.RELEASE]
    embed_rows = [i for i in active if i not in extrapolate]
    image: dict[int, ArrayT] = {}  # row -> (valid image tokens, D) hidden state for the head
    stats = CallStats(rows=len(active))
    if embed_rows:
        hidden, temb = stages.embed(inputs, embed_rows)
        start = hidden.shape[1] - img_len
        skip = _teacache_skips(stages, inputs, controls, store, embed_rows, hidden, temb)
        compute = [j for j, i in enumerate(embed_rows) if i not in skip]
        stats.main_layer_rows = len(compute)
        out = None
        if compute:
            rows = [embed_rows[j] for j in compute]
            out = stages.layers(_take(stages, hidden, compute), _take(stages, temb, compute), inputs, rows)
        if out is not None and len(compute) == batch and all(c.mode == Mode.NONE for c in controls):
            return stages.head(out[:, start:], inputs, embed_rows), stats  # no row cached: nothing to gather
        position = {j: k for k, j in enumerate(compute)}
        for j, i in enumerate(embed_rows):
            c, n = controls[i], stages.image_count(inputs, i)
            before = hidden[j, start : start + n]
            if i in skip:
                residual = store.entry(c).tea.residual
                assert residual is not None  # _teacache_skip computes a branch with any residual missing
                image[i] = before + residual
                continue
            assert out is not None
            after = out[position[j], start : start + n]
            image[i] = after
            if c.mode == Mode.TEACACHE:
                store.entry(c).tea.residual = after - before
            elif c.mode == Mode.TAYLORSEER:
                _taylor_update(store.entry(c).taylor, stages.copy(after), c.step)
    for i in extrapolate:
        image[i] = _taylor_extrapolate(store.entry(controls[i]).taylor, controls[i].step)
    if not active:  # a call of releases only
        return stages.zeros(tuple(inputs["img_tokens"].shape), like=inputs["img_tokens"]), stats
    padded: list[ArrayT] = []
    for i in active:
        tokens = image[i]
        if tokens.shape[0] < img_len:
            pad = stages.zeros((img_len - tokens.shape[0], tokens.shape[1]), like=tokens)
            tokens = stages.concat([tokens, pad])
        padded.append(tokens)
    velocity: ArrayT = stages.head(stages.concat([p[None] for p in padded]), inputs, active)
    if len(active) == batch:
        return velocity, stats
    full = stages.zeros((batch, *velocity.shape[1:]), like=velocity)
    for k, i in enumerate(active):
        full[i] = velocity[k]
    return full, stats


def _take(stages: Stages[ArrayT], array: ArrayT, rows: list[int]) -> ArrayT:
    """`rows` of `array`, without a copy when they are all of it, in order."""
    return array if rows == list(range(len(array))) else stages.take(array, rows)


def _teacache_skips(
    stages: Stages[ArrayT],
    inputs: Mapping[str, ArrayT],
    controls: Sequence[Control],
    store: CacheStore[ArrayT],
    embed_rows: list[int],
    hidden: ArrayT,
    temb: ArrayT,
) -> set[int]:
    """Rows (of the packed batch) whose branch skips the main layers this step; updates the TeaCache state."""
    tea = [j for j, i in enumerate(embed_rows) if controls[i].mode == Mode.TEACACHE]
    if not tea:
        return set()
    modulated = stages.modulate(_take(stages, hidden, tea), _take(stages, temb, tea))
    groups: dict[tuple[int, int], list[tuple[int, ArrayT]]] = {}
    for k, j in enumerate(tea):
        i = embed_rows[j]
        groups.setdefault(controls[i].group, []).append((i, modulated[k][stages.joint_mask(inputs, i)]))
    skip: set[int] = set()
    for group, members in groups.items():
        entries = [store.entry(controls[i]) for i, _ in members]
        control = controls[members[0][0]]
        decision = store.groups.setdefault(group, _TeaGroup())
        if decision.step != control.step:
            decision.step, decision.skip = control.step, _teacache_skip(decision, control, entries, members)
        if decision.skip:
            skip.update(i for i, _ in members)
        for entry, (_, m) in zip(entries, members, strict=True):
            entry.tea.modulated = m
    return skip


def _teacache_skip(
    decision: _TeaGroup, control: Control, entries: list[_Entry[ArrayT]], members: list[tuple[int, ArrayT]]
) -> bool:
    """The official rule: accumulate the rescaled relative L1 change of the modulated input; skip while the sum
    stays under the threshold, compute (and start over) otherwise, and always on the first and last steps."""
    previous = [p for e in entries if (p := e.tea.modulated) is not None]
    known = len(previous) == len(members) and all(
        p.shape == m.shape for p, (_, m) in zip(previous, members, strict=True)
    )
    if control.force or not known or any(e.tea.residual is None for e in entries):
        decision.accumulated = 0.0
        return False
    change = sum(float(abs(m - p).sum()) for p, (_, m) in zip(previous, members, strict=True))
    scale = sum(float(abs(p).sum()) for p in previous)
    if scale == 0.0:  # nothing to compare against: compute
        decision.accumulated = 0.0
        return False
    decision.accumulated += teacache_rescale(change / scale)
    if decision.accumulated < control.threshold:
        return True
    decision.accumulated = 0.0
    return False


def state_values(mode: Mode, branches: int, images: int, joint_tokens: int, image_tokens: int, hidden: int) -> int:
    """Values of cache state a request holds at its peak (times the compute dtype's size for bytes): TeaCache keeps
    the modulated input and the image residual per branch image, TaylorSeer up to 5 derivatives of the image
    tokens (the reference keeps them for every layer at every token: about num_layers times more)."""
    if mode == Mode.TEACACHE:
        return branches * images * (joint_tokens + image_tokens) * hidden
    if mode == Mode.TAYLORSEER:
        return branches * images * (TAYLOR_ORDER + 1) * image_tokens * hidden
    return 0


class CacheBudget:
    """The state bytes of the requests in flight, held against a bound: a request that would pass it runs
    uncached (and its response says so) rather than risk the transformer's memory."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.reserved = 0

    def reserve(self, nbytes: int) -> bool:
        if self.reserved + nbytes > self.limit_bytes:
            return False
        self.reserved += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes

    def refusal(self, nbytes: int) -> str:
        """Why `nbytes` more do not fit (reserve said no), in MiB with the decimals that keep the request's share
        shown past what is left: before, "its 1 MiB ... would pass the server's 1 MiB" (0.6 MiB rounded, half the
        budget held by other requests)."""
        free = max(self.limit_bytes - self.reserved, 0)
        need, left = nbytes / 2**20, free / 2**20
        shown = (d for d in range(1, 7) if round(need, d) > round(left, d) and (round(left, d) or not free))
        digits = next(shown, 7)  # 7 decimals: a byte apart shows
        return (
            f"ran uncached: its {need:.{digits}f} MiB of cache state would pass the {left:.{digits}f} MiB that the"
            f" requests in flight leave of the server's {self.limit_bytes / 2**20:g} MiB (--max-step-cache-mib)"
        )
