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


def test_dpm_solver_second_order_step_matches_hand_computed_values() -> None:
    """sigmas 4/5, 1/2, 1/3 at steps 1, 2, 3 make the log-SNRs lambda = log((1 - s) / s) equal -2L, 0, L (L = log 2),
    so h = L, r0 = 2, phi = alpha_t (e^-h - 1) = (2/3)(1/2 - 1) = -1/3, and sigma_t / sigma_s0 = 2/3.
    From x = 1: step 1 with v = 1/2 predicts x0' = 1 + 4/5 * 1/2 = 7/5; step 2 with v = -1/4 predicts
    x0 = 1 - 1/2 * 1/4 = 7/8, so D1 = (x0 - x0') / r0 = -21/80.
    First order:  2/3 * 1 + 1/3 * 7/8 = 23/24.  Second order: 23/24 - 1/2 * (-1/3) * D1 = 23/24 - 7/160 = 439/480."""
    grid = torch.tensor([0.0, 1 / 5, 1 / 2, 2 / 3, 1.0])
    sample = torch.ones(1, 1, 2, 2)
    _, previous = dpm_solver_step(sample, torch.full_like(sample, 0.5), grid, 1, None)
    second, x0 = dpm_solver_step(sample, torch.full_like(sample, -0.25), grid, 2, previous)
    first, _ = dpm_solver_step(sample, torch.full_like(sample, -0.25), grid, 2, None)
    torch.testing.assert_close(previous, torch.full_like(sample, 7 / 5))
    torch.testing.assert_close(x0, torch.full_like(sample, 7 / 8))
    torch.testing.assert_close(first, torch.full_like(sample, 23 / 24))
    torch.testing.assert_close(second, torch.full_like(sample, 439 / 480))


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_steps_match_diffusers_schedulers_on_the_same_grid(steps: int) -> None:
    """diffusers' FlowMatchEulerDiscreteScheduler and DPMSolverMultistepScheduler (dpmsolver++, 2M midpoint, flow
    prediction, zero final sigma) given this grid take the same steps: their sigma is 1 - t and their model output
    noise - image = -v. diffusers' DPM-Solver makes its own flow sigmas (from 1 - 1/1000, its own shift), so the
    grid is set on it by hand."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    grid = timesteps(steps, 32, 48)
    start, velocities = torch.randn(1, 16, 4, 6), [torch.randn(1, 16, 4, 6) for _ in range(steps)]
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    euler.set_timesteps(sigmas=(1 - grid[:-1]).tolist())
    dpm = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        final_sigmas_type="zero",
    )
    dpm.set_timesteps(steps)
    dpm.sigmas = 1 - grid
    ours_euler, theirs_euler, ours_dpm, theirs_dpm, previous = start, start, start, start, None
    for i, v in enumerate(velocities):
        ours_euler = euler_step(ours_euler, v, grid, i)
        theirs_euler = euler.step(-v, euler.timesteps[i], theirs_euler).prev_sample
        ours_dpm, previous = dpm_solver_step(ours_dpm, v, grid, i, previous)
        theirs_dpm = dpm.step(-v, dpm.timesteps[i], theirs_dpm).prev_sample
        torch.testing.assert_close(ours_euler, theirs_euler)
        torch.testing.assert_close(ours_dpm, theirs_dpm)
