"""Flow-matching schedules and solver steps as small pure functions.

Time runs from t=0 (noise) to t=1 (image); the model predicts the velocity v = image - noise.
Both solvers share one timestep grid: t_i = i/N with the dynamic time shift t <- t / (m - m t + t),
m = sqrt(h * w) / 40 for an (h, w) latent, and a final t_N = 1.
The arithmetic follows the reference's dtypes (float32 tensors) so that results agree to rounding.

Why not diffusers' scheduler classes: they are stateful objects (a step counter, DPM-Solver's buffer of earlier
outputs) made for one pipeline's loop, while the BLS advances many requests in one loop, each keeping its solver
state as plain tensors in its Denoiser (serving/pipeline/denoise.py); and diffusers' DPM-Solver makes its own flow
grid (from sigma 1 - 1/1000, with its own shift), not this one. tests/test_schedulers.py holds the steps equal to
diffusers' given this grid.
"""

from __future__ import annotations

import numpy as np
import torch


def timesteps(num_steps: int, latent_height: int, latent_width: int, dynamic_shift: bool = True) -> torch.Tensor:
    """The N+1 grid points t_0..t_N (float32); the transformer is evaluated at t_0..t_{N-1}."""
    grid = np.linspace(0, 1, num_steps + 1, dtype=np.float32)[:-1]
    if dynamic_shift:
        m = np.sqrt(latent_height * latent_width) / 40
        grid = grid / (m - m * grid + grid)
    t = torch.from_numpy(np.asarray(grid)).to(torch.float32)
    return torch.cat([t, torch.ones(1)])


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, grid: torch.Tensor, step: int) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} - t_i) v."""
    return (sample.float() + (grid[step + 1] - grid[step]) * velocity).to(velocity.dtype)


def dpm_solver_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    grid: torch.Tensor,
    step: int,
    previous_x0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ (2nd order multistep, midpoint) step on flow predictions.

    Returns (next sample, this step's data prediction x0), to be passed back as `previous_x0`.
    The first step and the last step (final sigma 0) are first order, as in the reference.
    """
    sigmas = 1 - grid  # sigma_N = 0: the grid ends at t = 1
    x0 = sample + sigmas[step] * velocity
    sample = sample.float()
    last = step == len(grid) - 2
    sigma_t, sigma_s0 = sigmas[step + 1], sigmas[step]
    alpha_t = 1 - sigma_t
    lambda_t = _log_snr(sigma_t)
    lambda_s0 = _log_snr(sigma_s0)
    h = lambda_t - lambda_s0
    phi = alpha_t * (torch.exp(-h) - 1.0)
    if previous_x0 is None or step == 0 or last:
        out = (sigma_t / sigma_s0) * sample - phi * x0
    else:
        lambda_s1 = _log_snr(sigmas[step - 1])
        r0 = (lambda_s0 - lambda_s1) / h
        d1 = (1.0 / r0) * (x0 - previous_x0)
        out = (sigma_t / sigma_s0) * sample - phi * x0 - 0.5 * phi * d1
    return out.to(velocity.dtype), x0


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma; +-inf at the ends is intended."""
    return torch.log(1 - sigma) - torch.log(sigma)
