"""LCM multistep consistency sampling (Luo et al. 2023, Algorithm 3), as diffusers' ``LCMScheduler``.

Each step maps x_t to the consistency function's output f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)
and, except after the last step, re-noises it to the next timestep with fresh noise.
"""
from __future__ import annotations

import numpy as np

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.samplers._common import check_timesteps, maybe_clip
from atdiff.runtime.schedule import NoiseSchedule, predict_x0

SIGMA_DATA = 0.5  # consistency-model boundary scaling constant (Song et al. 2023), fixed in LCMScheduler


def timesteps(schedule: NoiseSchedule, steps: int, *, original_inference_steps: int | None = None) -> np.ndarray:
    """LCM's skipping schedule: the distillation grid t_k = k * (T // N) - 1 (k = 1..N, N =
    ``original_inference_steps``, 50 by default), reversed, and ``steps`` entries taken at evenly spaced
    indices floor(linspace(0, N, steps, endpoint=False)) (diffusers' ``LCMScheduler.set_timesteps``)."""
    n_orig = int(original_inference_steps or schedule.original_inference_steps)
    total = schedule.num_train_timesteps
    if not 1 <= n_orig <= total:
        raise ToolkitError(f"original_inference_steps must be between 1 and {total}, got {n_orig}")
    if not 1 <= int(steps) <= n_orig:
        raise ToolkitError(f"LCM sampling takes 1 to {n_orig} steps (its distillation grid has {n_orig} "
                           f"timesteps), got {steps}; use 1-8 steps for LCM")
    origin = (np.arange(1, n_orig + 1) * (total // n_orig) - 1)[::-1]
    picks = np.floor(np.linspace(0, n_orig, num=int(steps), endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.int64)


def boundary_scalings(t: int, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) at discrete timestep t, with t scaled by ``timestep_scaling`` (10 in LCM) so
    c_skip ~ 0 and c_out ~ 1 for all but the smallest t (LCMScheduler's discrete boundary condition)."""
    scaled = t * timestep_scaling
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip, c_out


def sample(model, x, schedule: NoiseSchedule, timesteps, noise):
    """Run the LCM multistep sampler from x = x_T; returns the last step's denoised sample."""
    ts = check_timesteps(timesteps, schedule)
    for i, t in enumerate(ts):
        ab_t = schedule.alpha_bar(t)
        x0 = maybe_clip(predict_x0(model(x, t), x, ab_t, schedule.prediction_type), schedule)
        c_skip, c_out = boundary_scalings(t, schedule.timestep_scaling)
        denoised = c_out * x0 + c_skip * x
        if i == len(ts) - 1:
            return denoised
        # re-noise to the next timestep: x = sqrt(ab) f(x_t, t) + sqrt(1 - ab) z   (Algorithm 3, line 6)
        ab_next = schedule.alpha_bar(ts[i + 1])
        x = ab_next ** 0.5 * denoised + (1.0 - ab_next) ** 0.5 * noise(i)
