"""CFG branch selection and combination follow DESIGN.md's rules."""

from __future__ import annotations

import pytest
import torch

from serving.pipeline.guidance import Branch, combine, step_guidance

C, R, U = Branch.COND, Branch.REF, Branch.UNCOND


@pytest.mark.parametrize(
    ("text", "image", "has_refs", "branches"),
    [
        (5.0, 2.0, True, (C, R, U)),
        (5.0, 2.0, False, (C, U)),  # without input images s_img is 1
        (5.0, 1.0, True, (C, U)),
        (1.0, 2.0, True, (C,)),  # s_txt <= 1: cond only
        (0.5, 3.0, True, (C,)),
    ],
)
def test_branches_by_scales(text: float, image: float, has_refs: bool, branches: tuple[Branch, ...]) -> None:
    assert step_guidance(0, 10, text, image, (0.0, 1.0), has_refs).branches == branches


def test_cfg_range_bounds_are_inclusive_and_outside_runs_cond_only() -> None:
    active = [len(step_guidance(i, 5, 4.0, 2.0, (0.2, 0.6), True).branches) for i in range(5)]
    assert active == [1, 3, 3, 3, 1]  # i/N = 0, .2, .4, .6, .8


def test_combine_three_and_two_branch_formulas() -> None:
    # Unequal gaps (ref - uncond = 1, cond - ref = 3): swapped scales or branches give another number.
    cond, ref, uncond = torch.tensor([5.0]), torch.tensor([2.0]), torch.tensor([1.0])
    three = step_guidance(0, 1, 5.0, 2.0, (0.0, 1.0), True)
    assert combine(three, {C: cond, R: ref, U: uncond}).item() == pytest.approx(1 + 2 * (2 - 1) + 5 * (5 - 2))
    two = step_guidance(0, 1, 4.0, 1.0, (0.0, 1.0), False)
    assert combine(two, {C: cond, U: uncond}).item() == pytest.approx(1 + 4 * (5 - 1))
    one = step_guidance(0, 1, 1.0, 1.0, (0.0, 1.0), False)
    assert combine(one, {C: cond}).item() == 5.0
