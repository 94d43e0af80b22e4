"""DDPM / improved-DDPM ancestral sampling (Ho et al. 2020; Nichol & Dhariwal 2021) with timestep
respacing, as diffusers' ``DDPMScheduler`` with ``num_inference_steps``.

Respacing (IDDPM's ``respace.py``) keeps a subset of the training timesteps and treats consecutive
kept timesteps as one diffusion step: beta'_t = 1 - alpha_bar_t / alpha_bar_prev. The default grid is
improved-diffusion's own (``space_timesteps(T, [steps])``: round(linspace(0, T-1, steps)), so it starts at
t = T-1), not the scheduler config's spacing; ``spacing="leading"`` / ``"trailing"`` give diffusers' grids.

The UNets trained here predict epsilon only: the variances are fixed (``fixed_small`` / ``fixed_large``),
not IDDPM's learned ones.
"""
from __future__ import annotations

import numpy as np

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.samplers._common import check_timesteps, maybe_clip
from atdiff.runtime.schedule import NoiseSchedule, predict_x0, spaced_timesteps

VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


DEFAULT_SPACING = "linspace"  # improved-diffusion's respacing


def timesteps(schedule: NoiseSchedule, steps: int, *, spacing: str = DEFAULT_SPACING) -> np.ndarray:
    """``steps`` timesteps spaced per ``spacing`` (default: IDDPM's linspace); steps = T is full DDPM."""
    return spaced_timesteps(schedule, steps, spacing)


def step_std(ab_t: float, ab_prev: float, variance: str) -> float:
    """Standard deviation of the step's noise. fixed_small: the posterior variance
    beta~_t = (1 - ab_prev) / (1 - ab_t) * beta'_t (DDPM eq. 7, floored at 1e-20 like diffusers);
    fixed_large: beta'_t itself (DDPM section 3.2)."""
    beta = 1.0 - ab_t / ab_prev
    if variance == "fixed_large":
        return beta ** 0.5
    return max((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20) ** 0.5


def sample(model, x, schedule: NoiseSchedule, timesteps, noise, *, variance: str | None = None):
    """Ancestral sampling from x = x_T over ``timesteps`` (the step from each goes to the next entry,
    after the last to alpha_bar = 1). ``variance``: fixed_small | fixed_large (default: the schedule's
    ``variance_type``). Noise is added after every step whose timestep is > 0, as diffusers does."""
    variance = variance or schedule.variance_type
    if variance not in VARIANCES:
        raise ToolkitError(f"iddpm variance '{variance}' is not supported (learned variances need the "
                           f"model's variance output); use one of {', '.join(VARIANCES)}")
    ts = check_timesteps(timesteps, schedule)
    for i, t in enumerate(ts):
        # DDPMScheduler ends the chain at alpha_bar = 1 whatever set_alpha_to_one says
        ab_t = schedule.alpha_bar(t)
        ab_prev = schedule.alpha_bar(ts[i + 1]) if i + 1 < len(ts) else 1.0
        x0 = maybe_clip(predict_x0(model(x, t), x, ab_t, schedule.prediction_type), schedule)
        # posterior mean mu~(x_t, x0), DDPM eq. 7, with the respaced beta'_t = 1 - ab_t / ab_prev
        beta = 1.0 - ab_t / ab_prev
        x = (ab_prev ** 0.5 * beta / (1.0 - ab_t)) * x0 + ((1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab_t)) * x
        if t > 0:
            x = x + step_std(ab_t, ab_prev, variance) * noise(i)
    return x
