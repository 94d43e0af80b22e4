"""Samplers as pure functions, k-diffusion style (see docs/architecture.md, "Samplers"):

    sampler = get_sampler("ddim")
    ts = sampler.timesteps(schedule, steps)                  # int64, descending, training grid
    x0 = sampler.fn(model, x_T, schedule, ts, noise, **options)

``model(x, t)`` returns the raw network output (per ``schedule.prediction_type``); ``noise(i)`` returns
standard normal noise shaped like x for step i (called at most once per step, in step order, and only
by steps that inject noise). Nothing is kept between calls, and only array-with-Python-float arithmetic
is used, so numpy arrays and torch tensors both work.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.samplers import ddim, dpmpp_2m, iddpm, lcm
from atdiff.runtime.samplers.eps_scaling import eps_scaling


@dataclasses.dataclass(frozen=True)
class Sampler:
    name: str
    fn: Callable          # fn(model, x, schedule, timesteps, noise, **options) -> final sample
    timesteps: Callable   # timesteps(schedule, steps, **options) -> int64 descending
    stochastic: bool      # draws noise(i) with its default options


_SAMPLERS = {
    "lcm": Sampler("lcm", lcm.sample, lcm.timesteps, stochastic=True),
    "ddim": Sampler("ddim", ddim.sample, ddim.timesteps, stochastic=False),
    "dpmpp_2m": Sampler("dpmpp_2m", dpmpp_2m.sample, dpmpp_2m.timesteps, stochastic=False),
    "iddpm": Sampler("iddpm", iddpm.sample, iddpm.timesteps, stochastic=True),
}


def available_samplers() -> list[str]:
    return sorted(_SAMPLERS)


def get_sampler(name: str) -> Sampler:
    if name not in _SAMPLERS:
        raise ToolkitError(f"unknown sampler '{name}'; choose one of: {', '.join(available_samplers())}")
    return _SAMPLERS[name]


__all__ = ["Sampler", "available_samplers", "eps_scaling", "get_sampler"]
