"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), as diffusers' ``DPMSolverMultistepScheduler``
(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint").

Works in sigma = sqrt((1 - alpha_bar) / alpha_bar) with lambda = -log(sigma) (half the logSNR). The first
step is first order; later steps reuse the previous data prediction (multistep, second order).
Like diffusers' solver, it does not apply the schedule's ``clip_sample``. Both grids start below the
schedule's ``lambda_min_clipped`` (diffusers' setting of that name; -5.1 by default on the cosine schedule,
see ``atdiff.runtime.schedule.default_lambda_min_clipped``): for 'linspace' exactly as diffusers does, and for
'logsnr' by starting the logSNR range there (diffusers' ``use_lu_lambdas`` ignores the setting).
"""
from __future__ import annotations

import math

import numpy as np

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.samplers._common import check_timesteps
from atdiff.runtime.schedule import NoiseSchedule, predict_x0

SPACINGS = ("linspace", "logsnr")
FINAL_SIGMAS = ("zero", "sigma_min")


def _log_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    # a zero-terminal-SNR schedule ends at alpha_bar = 0 (sigma = inf); diffusers substitutes 2**-24
    ab = np.where(schedule.alphas_cumprod > 0, schedule.alphas_cumprod, 2.0 ** -24)
    return 0.5 * np.log((1.0 - ab) / ab)


def _sigma_to_t(log_sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional training timestep of a noise level, interpolating log sigma linearly between the two
    neighbouring training timesteps (k-diffusion / diffusers ``_sigma_to_t``)."""
    low = int(np.clip(np.count_nonzero(log_sigmas <= log_sigma) - 1, 0, len(log_sigmas) - 2))
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = min(max(w, 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def _logsnr_log_sigmas(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """``steps`` log-sigmas uniform in logSNR from the largest training noise level (capped at
    -lambda_min_clipped) to the smallest (Lu et al. 2022's 'logSNR' step selection; diffusers'
    ``use_lu_lambdas=True``)."""
    log_sigmas = _log_sigmas(schedule)
    return np.linspace(min(log_sigmas[-1], -schedule.lambda_min_clipped), log_sigmas[0], steps)


def last_timestep(schedule: NoiseSchedule) -> int:
    """One past the highest timestep the solver may start from: the training timesteps whose lambda =
    -log(sigma) is below ``lambda_min_clipped`` are cut off the end (diffusers' ``clipped_idx``)."""
    clipped = int(np.count_nonzero(-_log_sigmas(schedule) < schedule.lambda_min_clipped))
    return schedule.num_train_timesteps - clipped


def timesteps(schedule: NoiseSchedule, steps: int, *, spacing: str = "linspace") -> np.ndarray:
    """'linspace': time-uniform, round(linspace(0, last-1, steps+1)) descending without its final 0, where
    last is ``last_timestep`` (T unless lambda_min_clipped cuts the top);
    'logsnr': the timesteps nearest the logSNR-uniform noise levels (the sampler then uses those exact
    noise levels; the model sees the rounded timestep)."""
    if spacing not in SPACINGS:
        raise ToolkitError(f"dpmpp_2m spacing '{spacing}' is not supported; use one of {', '.join(SPACINGS)}")
    total = schedule.num_train_timesteps
    if not 1 <= int(steps) <= total:
        raise ToolkitError(f"steps must be between 1 and the model's {total} training timesteps, got {steps}")
    if spacing == "linspace":
        return np.linspace(0, last_timestep(schedule) - 1, int(steps) + 1).round()[::-1][:-1].astype(np.int64)
    log_sigmas = _log_sigmas(schedule)
    ts = np.array([_sigma_to_t(s, log_sigmas) for s in _logsnr_log_sigmas(schedule, int(steps))])
    # diffusers rounds, except for the cosine schedule where its int64 cast truncates
    # (with many steps two neighbouring levels can share a timestep near t=0; their sigmas still differ)
    return (np.floor(ts) if schedule.beta_schedule == "squaredcos_cap_v2" else np.round(ts)).astype(np.int64)


def noise_levels(schedule: NoiseSchedule, ts: list[int]) -> list[float]:
    """sigma for each timestep: the exact logSNR-uniform levels when ``ts`` is that grid (as diffusers
    keeps them), otherwise each training timestep's own sigma."""
    if np.array_equal(ts, timesteps(schedule, len(ts), spacing="logsnr")):
        return [math.exp(v) for v in _logsnr_log_sigmas(schedule, len(ts))]
    log_sigmas = _log_sigmas(schedule)
    return [math.exp(float(log_sigmas[t])) for t in ts]


def sample(model, x, schedule: NoiseSchedule, timesteps, noise, *, final_sigma: str = "zero",
           lower_order_final: bool = True):
    """Run DPM-Solver++(2M) from x = x_T. ``final_sigma``: 'zero' ends at sigma 0 (the last step returns
    the data prediction) or 'sigma_min' (ends at t=0's noise level). With 'sigma_min', the last step is
    first order when ``lower_order_final`` and fewer than 15 steps (stabilizes few-step sampling)."""
    if final_sigma not in FINAL_SIGMAS:
        raise ToolkitError(f"dpmpp_2m final_sigma '{final_sigma}' is not supported; use one of {', '.join(FINAL_SIGMAS)}")
    ts = check_timesteps(timesteps, schedule, strict=False)
    last = 0.0 if final_sigma == "zero" else math.exp(float(_log_sigmas(schedule)[0]))
    sigmas = noise_levels(schedule, ts) + [last]
    n, x0_prev, h_prev = len(ts), None, None
    for i, t in enumerate(ts):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = predict_x0(model(x, t), x, 1.0 / (1.0 + s * s), schedule.prediction_type)
        if s_next == 0.0:  # lambda_next = inf: the update's limit is the data prediction itself
            x = x0
            continue
        h = math.log(s) - math.log(s_next)                 # lambda_next - lambda
        alpha_next = (1.0 + s_next * s_next) ** -0.5
        ratio = (s_next * alpha_next) / (s * (1.0 + s * s) ** -0.5)   # sigma_t_next / sigma_t
        coef = alpha_next * math.expm1(-h)                  # alpha_next (e^-h - 1) < 0
        x = ratio * x - coef * x0                           # DPM-Solver++(1) (= DDIM), eq. (9)
        first_order = x0_prev is None or (i == n - 1 and lower_order_final and n < 15)
        if not first_order:                                 # 2M correction, Algorithm 2
            x = x - (0.5 * coef * h / h_prev) * (x0 - x0_prev)
        x0_prev, h_prev = x0, h
    return x
