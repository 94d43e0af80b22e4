"""DDIM (Song et al. 2021), deterministic for eta=0 and DDPM-like for eta=1, as diffusers' ``DDIMScheduler``."""
from __future__ import annotations

import numpy as np

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.samplers._common import check_timesteps, maybe_clip
from atdiff.runtime.schedule import NoiseSchedule, predict_x0_eps, spaced_timesteps


def timesteps(schedule: NoiseSchedule, steps: int, *, spacing: str | None = None) -> np.ndarray:
    """``steps`` timesteps spaced per ``spacing`` (default: the schedule's ``timestep_spacing``)."""
    return spaced_timesteps(schedule, steps, spacing)


def sample(model, x, schedule: NoiseSchedule, timesteps, noise, *, eta: float = 0.0,
           use_clipped_model_output: bool = False):
    """Run DDIM from x = x_T. ``eta`` > 0 adds sigma_t(eta) * noise(i) at every step.

    The step from t goes to t - T // len(timesteps), diffusers' rule: that is the next grid entry for
    'leading' spacing (and 'trailing' when the step count divides T); below 0 it is the end of the chain,
    alpha_bar = ``final_alpha_cumprod``.
    """
    eta = float(eta)
    if eta < 0:
        raise ToolkitError(f"DDIM eta must be >= 0 (0: deterministic, 1: DDPM-like), got {eta}")
    ts = check_timesteps(timesteps, schedule)
    jump = schedule.num_train_timesteps // len(ts)
    for i, t in enumerate(ts):
        ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t - jump)
        x0, eps = predict_x0_eps(model(x, t), x, ab_t, schedule.prediction_type)
        x0 = maybe_clip(x0, schedule)
        if use_clipped_model_output:  # re-derive eps from the clipped x0 (GLIDE)
            eps = (x - ab_t ** 0.5 * x0) / (1.0 - ab_t) ** 0.5
        # sigma_t(eta), DDIM eq. (16)
        std = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)) ** 0.5
        # DDIM eq. (12): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        # (max: for eta > 1 the direction term would be imaginary; it is dropped instead of NaN)
        x = ab_prev ** 0.5 * x0 + max(1.0 - ab_prev - std ** 2, 0.0) ** 0.5 * eps
        if eta > 0:
            x = x + std * noise(i)
    return x
