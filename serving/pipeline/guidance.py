"""Classifier-free guidance with up to three branches, and which branches a step needs.

cond   = (prompt, reference images)
ref    = (negative prompt, reference images)
uncond = (negative prompt, no reference images)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # arithmetic on tensors only: the front end plans guidance without torch
    import torch


class Branch(StrEnum):
    COND = "cond"
    REF = "ref"
    UNCOND = "uncond"


@dataclass(frozen=True)
class StepGuidance:
    """The scales in force at one step and the branches they need."""

    text_scale: float
    image_scale: float
    branches: tuple[Branch, ...]


def step_guidance(
    step: int,
    num_steps: int,
    text_scale: float,
    image_scale: float,
    cfg_range: tuple[float, float],
    has_refs: bool,
) -> StepGuidance:
    """Guidance applies only when cfg_range[0] <= step/N <= cfg_range[1]; outside, cond alone runs."""
    in_range = cfg_range[0] <= step / num_steps <= cfg_range[1]
    s_txt = text_scale if in_range else 1.0
    s_img = image_scale if (in_range and has_refs) else 1.0
    if s_txt > 1.0 and s_img > 1.0:
        return StepGuidance(s_txt, s_img, (Branch.COND, Branch.REF, Branch.UNCOND))
    if s_txt > 1.0:
        return StepGuidance(s_txt, 1.0, (Branch.COND, Branch.UNCOND))
    return StepGuidance(1.0, 1.0, (Branch.COND,))


def combine(guidance: StepGuidance, preds: dict[Branch, torch.Tensor]) -> torch.Tensor:
    """v = v_u + s_img (v_ref - v_u) + s_txt (v_c - v_ref), or v_u + s_txt (v_c - v_u), or v_c."""
    cond = preds[Branch.COND]
    if Branch.REF in guidance.branches:
        ref, uncond = preds[Branch.REF], preds[Branch.UNCOND]
        return uncond + guidance.image_scale * (ref - uncond) + guidance.text_scale * (cond - ref)
    if Branch.UNCOND in guidance.branches:
        uncond = preds[Branch.UNCOND]
        return uncond + guidance.text_scale * (cond - uncond)
    return cond
