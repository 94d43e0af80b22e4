"""Epsilon scaling (ES; Ning et al. 2023, "Elucidating the Exposure Bias in Diffusion Models").

A sampler fed by a network trained with teacher forcing sees its own, slightly off, x_t at inference,
and the predicted noise comes out too large (exposure bias). ES divides the predicted eps by a factor
lambda_t slightly above 1 (about 1.017 for ADM with 20-100 steps). It changes no sampler: it wraps the
model, so it works with every sampler of an epsilon-prediction model.
"""
from __future__ import annotations

from collections.abc import Callable

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.schedule import NoiseSchedule


def eps_scaling(model, schedule: NoiseSchedule, factor: float | Callable[[int], float]):
    """``model`` with its eps output divided by ``factor``: a constant lambda, or a function of the
    training timestep t for the paper's linear variant, e.g. ``lambda t: k * t + b``."""
    if schedule.prediction_type != "epsilon":
        raise ToolkitError(f"epsilon scaling needs an epsilon-prediction model, but this schedule's "
                           f"prediction_type is '{schedule.prediction_type}'; sample without eps scaling")
    factor_at = factor if callable(factor) else (lambda t, value=float(factor): value)

    def scaled(x, t):
        lam = float(factor_at(t))
        if lam <= 0:
            raise ToolkitError(f"eps scaling factor must be positive (about 1.017), got {lam} at t={t}")
        return model(x, t) / lam

    return scaled
