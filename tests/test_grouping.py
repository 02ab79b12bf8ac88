"""Shape grouping of a batched step: padding is traded against the fixed cost of a call."""

from __future__ import annotations

import math

import pytest
import torch

from serving.model.spec import ModelSpec
from serving.pipeline.denoise import Sample, pack_samples, sample_shape
from serving.pipeline.grouping import CallCost, SampleShape, padded_tokens, plan_calls
from serving.pipeline.guidance import Branch

T2I = SampleShape(text=32, refs=(), image=256)
EDIT = SampleShape(text=32, refs=(256,), image=256)
THREE_REFS = SampleShape(text=32, refs=(256, 256, 256), image=256)
SPEC = ModelSpec(patch_size=2, axes_dim_rope=(8, 4, 4), vae_scaling_factor=0.3611, vae_shift_factor=0.1159)


def test_padded_tokens_follow_packing() -> None:
    """The planner's token count is the size of the batch `pack_samples` builds."""
    samples = [
        Sample(Branch.COND, torch.zeros(16, 8, 8), torch.tensor(0.5), torch.zeros(5, 4), (torch.zeros(16, 4, 6),)),
        Sample(Branch.UNCOND, torch.zeros(16, 8, 4), torch.tensor(0.5), torch.zeros(11, 4), ()),
    ]
    shapes = [sample_shape(s, SPEC.patch_size, text_multiple=8) for s in samples]
    assert shapes == [SampleShape(8, (6,), 16), SampleShape(16, (), 8)]
    packed = pack_samples(samples, SPEC, text_multiple=8)
    assert padded_tokens(shapes) == packed.rope_cos.shape[0] * packed.rope_cos.shape[1]


def test_unknown_overhead_keeps_one_call() -> None:
    assert plan_calls([T2I, EDIT, THREE_REFS, T2I], math.inf) == [[0, 1, 2, 3]]


def test_expensive_padding_splits_by_shape() -> None:
    """Three-reference branches and an unconditional one: padding the latter costs 3 images, a call costs less."""
    shapes = [THREE_REFS, THREE_REFS, T2I, EDIT, EDIT, T2I]
    assert plan_calls(shapes, overhead_tokens=50) == [[0, 1], [2, 5], [3, 4]]


def test_cheap_padding_is_shared() -> None:
    """Text lengths one bucket apart pad little: one call beats two."""
    longer = SampleShape(text=48, refs=(), image=256)
    assert plan_calls([T2I, longer, T2I], overhead_tokens=100) == [[0, 1, 2]]


@pytest.mark.parametrize("overhead", [0.0, 10.0, 300.0, 10_000.0])
def test_every_sample_is_planned_once(overhead: float) -> None:
    shapes = [T2I, EDIT, THREE_REFS, EDIT, T2I, THREE_REFS, SampleShape(64, (128, 64), 1024)]
    calls = plan_calls(shapes, overhead)
    assert sorted(i for call in calls for i in call) == list(range(len(shapes)))
    planned = sum(padded_tokens([shapes[i] for i in call]) + overhead for call in calls)
    assert planned <= padded_tokens(shapes) + overhead  # never worse than one call for everything


def test_call_cost_learns_seconds_per_token() -> None:
    cost = CallCost(fixed_s=0.010)
    assert cost.overhead_tokens == math.inf
    cost.observe(tokens=1000, seconds=0.110)  # 0.1 ms per token beyond the fixed cost
    assert cost.overhead_tokens == pytest.approx(100.0)
    cost.observe(tokens=1000, seconds=0.210)
    assert 50.0 < cost.overhead_tokens < 100.0  # smoothed toward the new rate


def test_calls_within_the_fixed_cost_share() -> None:
    """A tiny model: calls take less than the fixed cost, so padding is never worth a call."""
    cost = CallCost(fixed_s=0.010)
    cost.observe(tokens=300, seconds=0.004)
    assert cost.overhead_tokens == math.inf


def test_calls_above_the_token_cap_are_cut_evenly() -> None:
    """16 three-reference samples of 1056 tokens under a 7000-token cap: 6 fit a call, so three calls of 5-6."""
    shapes = [THREE_REFS] * 16
    calls = plan_calls(shapes, math.inf, max_tokens=7000)
    assert [len(c) for c in calls] == [5, 5, 6]
    assert [i for c in calls for i in c] == list(range(16))
    assert all(padded_tokens([shapes[i] for i in c]) <= 7000 for c in calls)


def test_the_cap_stops_merges_but_not_single_samples() -> None:
    """Without the cap the unknown overhead would share one call; with it, shapes stay apart, and a sample larger
    than the cap still gets its own call."""
    huge = SampleShape(text=32, refs=(4096,), image=4096)
    assert plan_calls([T2I, EDIT, T2I], math.inf, max_tokens=700) == [[0, 2], [1]]
    assert plan_calls([huge, T2I], math.inf, max_tokens=700) == [[0], [1]]
