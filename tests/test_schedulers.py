"""Schedules and solver steps: known values and exactness on a straight flow."""

from __future__ import annotations

import math

import pytest
import torch

from serving.pipeline.schedulers import dpm_solver_step, euler_step, timesteps


def test_grid_without_shift_is_uniform_and_ends_at_one() -> None:
    grid = timesteps(4, 8, 8, dynamic_shift=False)
    assert grid.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_dynamic_shift_at_1024_pixels_uses_m_3_2() -> None:
    grid = timesteps(2, 128, 128)  # a 1024x1024 image: 128x128 latent
    m = math.sqrt(128 * 128) / 40
    assert m == pytest.approx(3.2)
    assert grid[1].item() == pytest.approx(0.5 / (m - m * 0.5 + 0.5), rel=1e-6)
    assert grid[0].item() == 0.0 and grid[-1].item() == 1.0


@pytest.mark.parametrize("steps", [1, 2, 5, 17])
def test_both_solvers_are_exact_on_a_straight_flow(steps: int) -> None:
    """With a constant velocity v the path noise -> noise + v is a line; both solvers must land on its end."""
    torch.manual_seed(0)
    noise, velocity = torch.randn(1, 16, 4, 6), torch.randn(1, 16, 4, 6)
    grid = timesteps(steps, 4, 6)
    euler = noise.clone()
    dpm, previous = noise.clone(), None
    for i in range(steps):
        euler = euler_step(euler, velocity, grid, i)
        dpm, previous = dpm_solver_step(dpm, velocity, grid, i, previous)
    torch.testing.assert_close(euler, noise + velocity, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpm, noise + velocity, rtol=1e-5, atol=1e-5)


def test_dpm_solver_second_order_differs_from_first_order_on_a_curved_flow() -> None:
    grid = timesteps(6, 4, 4)
    sample, v1, v2 = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), -0.25)
    _, x0 = dpm_solver_step(sample, v1, grid, 1, None)
    second, _ = dpm_solver_step(sample, v2, grid, 2, x0)
    first, _ = dpm_solver_step(sample, v2, grid, 2, None)
    assert not torch.allclose(first, second)
