"""Checks and array helpers shared by the samplers.

Samplers only combine arrays with Python floats, so one implementation runs on numpy arrays (ONNX
Runtime on CPU) and torch tensors alike; the one namespace-specific operation (clipping) goes through
array-api-compat, which picks numpy / torch / ... from the array itself.
"""
from __future__ import annotations

import numpy as np

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.schedule import NoiseSchedule


def check_timesteps(timesteps, schedule: NoiseSchedule, strict: bool = True) -> list[int]:
    """``timesteps`` as Python ints, after checking they are a non-empty, descending grid of training
    timesteps (what every sampler's ``timesteps()`` returns); ``strict=False`` allows repeats."""
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
        raise ToolkitError(f"timesteps must be a non-empty 1-D integer array, got shape {ts.shape} dtype {ts.dtype}; "
                           "use sampler.timesteps(schedule, steps)")
    rising = np.diff(ts) >= 0 if strict else np.diff(ts) > 0
    if ts.min() < 0 or ts.max() >= schedule.num_train_timesteps or np.any(rising):
        raise ToolkitError(f"timesteps must descend {'strictly ' if strict else ''}within [0, {schedule.num_train_timesteps - 1}], "
                           f"got {ts.tolist()}; use sampler.timesteps(schedule, steps)")
    return [int(t) for t in ts]


def maybe_clip(x0, schedule: NoiseSchedule):
    """Clip the predicted x0 to +-clip_sample_range when the schedule asks for it (pixel-space DDPM)."""
    if not schedule.clip_sample:
        return x0
    from array_api_compat import array_namespace
    limit = schedule.clip_sample_range
    return array_namespace(x0).clip(x0, -limit, limit)
